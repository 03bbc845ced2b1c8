"""`diagram`: the model drawn as a Mermaid graph, read off the model itself.

Nothing here lists cells or hooks by hand. One tiny forward pass on a (1, seq) dummy input runs
with every hook point attached; each hook records its tensor's shape and tags its output, so that
autograd's graph tells which hooks each hook was computed from. Those dependencies are the edges
(a residual add is a hook with several parents), the hook names are the nodes, grouped into
subgraphs by module path (blocks, then cells), and each edge carries the shape of what flows along it.

Axis names (seq, n_heads, d_head, d_model, …) come from a twin of the model whose sizes are all
different from each other: the same config with only the sizes changed, run through the same code,
so an axis of size 8 is never mistaken for another one of size 8. Batch (always first) is left out.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from glassformer.config import Config
from glassformer.errors import GlassformerError
from glassformer.hooks import HookPoint
from glassformer.model import Transformer

# Sizes of the twin model used to name axes: all different, all above 1.
_TWIN = dict(d_model=14, n_heads=6, d_head=4, d_mlp=17, d_vocab=19)
_TWIN_KV_HEADS = 2  # grouped-query twins; otherwise n_kv_heads = n_heads
_TWIN_EXPERTS = dict(n_experts=9, n_experts_per_token=2, d_expert_mlp=11)  # mixture-of-experts twins
_TWIN_SHARED_EXPERT = 13  # d_shared_expert_mlp, when there is one
_SEQ, _SRC_SEQ = 3, 5  # dummy lengths: the sequence (decoder side) and the encoder's source


@dataclass
class Flow:
    """What one forward pass shows: hooks in firing order, their shapes, and who feeds whom."""

    order: list[str] = field(default_factory=list)  # hook names, as they fired
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    parents: dict[str, list[str]] = field(default_factory=dict)  # hook -> hooks it was computed from
    sums: set[str] = field(default_factory=set)  # hooks whose last operation adds two hooked branches


def dummy_inputs(cfg: Config, seq: int = _SEQ, src_seq: int = _SRC_SEQ) -> tuple[Tensor, ...]:
    """(1, seq) token ids; an encoder-decoder model gets a (1, src_seq) source and a (1, seq) target."""
    seq, src_seq = min(seq, cfg.n_ctx), min(src_seq, cfg.n_ctx)

    def ids(n: int) -> Tensor:
        return (torch.arange(n) % cfg.d_vocab)[None]  # (1, n)

    return (ids(src_seq), ids(seq)) if cfg.arch == "encoder-decoder" else (ids(seq),)


def flow(model: Transformer, inputs: tuple[Tensor, ...]) -> Flow:
    """Run `model(*inputs)` with every hook attached and read the hook-to-hook data flow from autograd."""
    result = Flow()
    node_of: dict[object, str] = {}  # autograd node of a hook's tagged output -> hook name
    producer: dict[str, object] = {}  # hook name -> the node that computed its input

    def tag(x: Tensor, hook: HookPoint) -> Tensor:
        # x + 0 with a leaf of its own: every hook output gets a distinct autograd node, also when x
        # needs no gradient (a fixed sinusoid table) or is the very tensor another hook saw.
        out = x + torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
        result.order.append(hook.name)
        result.shapes[hook.name] = tuple(x.shape)
        producer[hook.name] = out.grad_fn.next_functions[0][0]
        node_of[out.grad_fn] = hook.name
        return out

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), model.hooks([(lambda name: True, tag)]):
            model(*(t.to(device) for t in inputs))
    finally:
        model.train(was_training)
    rank = {name: i for i, name in enumerate(result.order)}
    for name in result.order:
        parents = _hook_ancestors(producer[name], node_of)
        result.parents[name] = sorted(parents, key=rank.__getitem__)
        if _is_sum(producer[name], node_of):
            result.sums.add(name)
    return result


def _is_sum(node: object, node_of: dict[object, str]) -> bool:
    """An addition of separately hooked branches (a residual add), not `x + bias` nor `q·cos + q'·sin`."""
    if node is None or not type(node).__name__.startswith("AddBackward"):
        return False
    branches = [set(_hook_ancestors(next_node, node_of)) for next_node, _ in node.next_functions]
    return len(branches) == 2 and all(branches) and not branches[0] & branches[1]


def _hook_ancestors(start: object, node_of: dict[object, str]) -> list[str]:
    """Hooks reached walking back from `start` through autograd, stopping at each hook found."""
    found: list[str] = []
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node in node_of:
            if node_of[node] not in found:
                found.append(node_of[node])
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def twin_config(cfg: Config) -> Config:
    """The same wiring with sizes that are all different, to tell axes apart by their size."""
    n_kv_heads = _TWIN["n_heads"] if cfg.n_kv_heads == cfg.n_heads else _TWIN_KV_HEADS
    n_ctx = max(_SEQ, _SRC_SEQ, 8)
    experts = {}
    if cfg.n_experts:
        experts = _TWIN_EXPERTS | {"d_shared_expert_mlp": _TWIN_SHARED_EXPERT if cfg.d_shared_expert_mlp else 0}
    twin = dict(n_kv_heads=n_kv_heads, n_ctx=n_ctx, rotary_dim=None, dropout=0.0)
    return dataclasses.replace(cfg, **_TWIN, **twin, **experts)


def axis_names(cfg: Config) -> dict[str, list[str]]:
    """Per hook, the name of each axis after batch (`seq`, `n_heads`, …, or the size itself)."""
    twin = twin_config(cfg)
    model = Transformer(twin, seed=0)
    sizes = {twin.n_kv_heads: "n_kv_heads", twin.n_heads: "n_heads", twin.d_model: "d_model"}  # n_heads wins ties
    sizes |= {twin.d_head: "d_head", twin.d_mlp: "d_mlp", twin.d_vocab: "d_vocab"}
    if twin.n_experts:  # expert hooks see (routed tokens, d_expert_mlp): the routed axis stands where batch does
        sizes |= {twin.n_experts: "n_experts", twin.d_expert_mlp: "d_expert_mlp"}
        sizes |= {_TWIN_SHARED_EXPERT: "d_shared_expert_mlp"}
    if cfg.arch == "encoder-decoder":
        sizes |= {_SEQ: "tgt_seq", _SRC_SEQ: "src_seq"}
    else:
        sizes[_SEQ] = "seq"
    shapes = flow(model, dummy_inputs(twin)).shapes
    return {name: _suffix_repeats([sizes.get(n, str(n)) for n in shape[1:]]) for name, shape in shapes.items()}


def _suffix_repeats(names: list[str]) -> list[str]:
    """A sequence axis that appears twice is queries then keys: (n_heads, seqQ, seqK)."""
    repeated = [n for n in names if names.count(n) == 2 and n.endswith("seq")]
    if not repeated:
        return names
    out, first = [], True
    for n in names:
        if n == repeated[0]:
            n, first = n + ("Q" if first else "K"), False
        out.append(n)
    return out


def shape_label(shape: tuple[int, ...], names: list[str] | None) -> str:
    """`(seq, n_heads=2, d_head=4)`: sequence axes by name (their size is the dummy's), others with sizes."""
    dims = shape[1:]
    if names is None or len(names) != len(dims):
        return "(" + ", ".join(map(str, dims)) + ")"
    parts = [n if "seq" in n or n == str(d) else f"{n}={d}" for n, d in zip(names, dims, strict=True)]
    return "(" + ", ".join(parts) + ")"


def _node_id(name: str) -> str:
    return "h_" + name.replace(".", "_")


def _module_path(hook: str) -> str:
    return hook.rpartition(".")[0]


def _title(model: Transformer, path: str) -> str:
    """`blocks.0 · Block`, `blocks.0.attn · Attention`: the module path and its class."""
    return f"{path} · {type(model.get_submodule(path)).__name__}"


def diagram(model: Transformer) -> str:
    """A Mermaid `graph TD` of `model`: every hook point, the data flow between them, shapes on edges."""
    cfg = model.cfg
    seen = flow(model, dummy_inputs(cfg))
    names = axis_names(cfg)
    labels = {h: shape_label(seen.shapes[h], names.get(h)) for h in seen.order}
    has_children = {parent for parents in seen.parents.values() for parent in parents}

    lines = [
        "graph TD",
        f"  %% glassformer diagram: {cfg.arch}, {cfg.n_layers} layer(s), d_model={cfg.d_model}, "
        f"{cfg.n_heads} heads × d_head={cfg.d_head}; read from one forward pass of the model",
    ]
    lines += _inputs(cfg, seen)
    lines += _subgraphs(model, seen, labels, has_children)
    for hook in seen.order:
        parents = seen.parents[hook]
        for parent in parents:
            lines.append(f'  {_node_id(parent)} -->|"{labels[parent]}"| {_node_id(hook)}')
        if not parents:
            source = _input_of(cfg, hook)
            lines.append(f'  {source} -->|"{_input_shape(cfg, source)}"| {_node_id(hook)}')
    unreached = [h for h in model.hook_dict if h not in seen.shapes]
    if unreached:
        lines.append(f"  %% hook points the forward pass does not reach: {', '.join(unreached)}")
    return "\n".join(lines) + "\n"


def _inputs(cfg: Config, seen: Flow) -> list[str]:
    used = sorted({_input_of(cfg, h) for h in seen.order if not seen.parents[h]})
    return [f'  {name}(["{name} {_input_shape(cfg, name)}"])' for name in used]


def _input_of(cfg: Config, hook: str) -> str:
    """Which input a hook with no hook ancestors comes from: the tokens of its stack."""
    if cfg.arch != "encoder-decoder":
        return "tokens"
    return "src_tokens" if hook.startswith("encoder.") else "tgt_tokens"


def _input_shape(cfg: Config, source: str) -> str:
    return "(src_seq)" if source == "src_tokens" else "(tgt_seq)" if source == "tgt_tokens" else "(seq)"


def _subgraphs(model: Transformer, seen: Flow, labels: dict[str, str], has_children: set[str]) -> list[str]:
    """Nested subgraphs by module path: the stack's blocks, each block's cells, and their hooks."""
    tree: dict[str, list[str]] = defaultdict(list)  # module path -> hooks directly inside
    for hook in seen.order:
        tree[_module_path(hook)].append(hook)
    paths = set()
    for path in tree:
        parts = path.split(".") if path else []
        paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))

    rank = {name: i for i, name in enumerate(seen.order)}
    first = {p: min(rank[h] for h in seen.order if h.startswith(p + ".")) for p in paths}  # when a module starts

    def node(hook: str) -> str:
        text = f"⊕ {hook}" if hook in seen.sums else hook
        if hook not in has_children:
            text += f"<br/>{labels[hook]}"  # a sink shows its own shape: no edge leaves it
        return f'{_node_id(hook)}["{text}"]'

    def emit(path: str, depth: int) -> list[str]:
        pad = "  " * depth
        items = [(rank[h], h, False) for h in tree.get(path, [])]
        items += [(first[p], p, True) for p in paths if _module_path(p) == path]
        out = []
        for _, item, is_module in sorted(items):
            if not is_module:
                out.append(f"{pad}{node(item)}")
            elif isinstance(model.get_submodule(item), nn.ModuleList):
                out += emit(item, depth)  # a list of blocks is no cell of its own: its blocks sit in the parent
            else:
                sub = emit(item, depth + 1)
                out += [f'{pad}subgraph {_node_id(item)}["{_title(model, item)}"]', *sub, f"{pad}end"]
        return out

    return emit("", 1)


def render(text: str, path: str | Path) -> Path:
    """Render Mermaid `text` to SVG or PNG (by `path`'s suffix) with a local `mmdc` (mermaid-cli).

    Nothing is downloaded: without `mmdc` on PATH this raises `FileNotFoundError` saying so.
    """
    path = Path(path)
    if path.suffix.lower() not in (".svg", ".png"):
        raise ValueError(f"render path {str(path)!r} must end in .svg or .png")
    mmdc = shutil.which("mmdc")
    if mmdc is None:
        raise FileNotFoundError(
            "no local Mermaid renderer: `mmdc` (mermaid-cli) is not on PATH; paste the Mermaid text into any "
            "Mermaid viewer, or install mermaid-cli yourself (glassformer never downloads one)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "diagram.mmd"
        source.write_text(text)
        done = subprocess.run([mmdc, "-i", str(source), "-o", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise GlassformerError(f"mmdc could not render {path} (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return path
