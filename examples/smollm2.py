import glassformer as gf
from glassformer.inspect.attention import patterns
from glassformer.opening import default_model_path

model = gf.Transformer.from_gguf(default_model_path())  # SmolLM2-135M-Instruct (Q4_1), shipped on PyPI
print(model.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=20))

prompt = "The Eiffel Tower is in the city of"
print(model.generate(prompt, max_new_tokens=2))
print(model.to_str_tokens(prompt))

walk = gf.trace(model, prompt)  # the last token through every cell of the 30 blocks
print("\n".join(str(walk).splitlines()[:24]), "\n  ...")

pattern = patterns(model, prompt)  # (n_layers, n_heads, q_pos, k_pos)
reach = pattern[:, :, -1, 1:].max(-1).values  # each head's strongest look back from the last token, past the first
labels = model.to_str_tokens(prompt)
for flat in reach.flatten().topk(3).indices.tolist():
    layer, head = divmod(flat, model.cfg.n_heads)
    weights = pattern[layer, head, -1].tolist()
    print(f"L{layer}H{head}:", "  ".join(f"{t!r} {w:.2f}" for t, w in zip(labels, weights, strict=True)))
