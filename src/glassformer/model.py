"""`Transformer`: embedding, one stack of blocks (two for encoder-decoder), output head.

Decoder-only and encoder-only models carry their stack's parts at top level, so hooks are named as
in TransformerLens (`blocks.0.attn.hook_pattern`); an encoder-decoder model has `encoder.blocks.…`
and `decoder.blocks.…`. Legend: batch, pos, d_model, d_vocab.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from glassformer.cells.attention import AttentionMask
from glassformer.cells.block import Block
from glassformer.cells.embed import Embed, Pooler, TokenTypeEmbed, Unembed
from glassformer.cells.norm import make_norm
from glassformer.cells.position import PosEmbed, Rotary
from glassformer.cells.relative_position import RelativePositionBias
from glassformer.chat import ChatSession, Message, chat
from glassformer.checkpoints.gguf import read_gguf, write_gguf
from glassformer.checkpoints.gguf_schemes import gguf_plan
from glassformer.checkpoints.hf import read_hf, to_hf
from glassformer.checkpoints.native import check_state, read, write
from glassformer.config import Config
from glassformer.errors import CircuitError, InputError
from glassformer.factored import FactoredMatrix
from glassformer.generate import generate, stream
from glassformer.hooks import HookedRoot, HookPoint
from glassformer.inputs import check_mask, check_tokens
from glassformer.kv_cache import KVCache
from glassformer.quantize import apply, product_weights, quantize
from glassformer.quantized import dense
from glassformer.text import Text, TextIO, generate_text, is_text, stream_text
from glassformer.tokenizer import TextTokenizer, directory_tokenizer


def add_stack(
    module: nn.Module, cfg: Config, n_layers: int, causal: bool, cross: bool, rotary: dict[str, Rotary] | None
) -> None:
    """Give `module` the parts of a stack: its positions (a table, or a relative bias on the scores;
    and segment types), embedding hooks, `blocks` and `ln_final`. The token embedding itself is the
    model's, shared by both stacks. `rotary` maps a layer type ("full", "sliding") to the rotary
    cell its layers use."""
    module.hook_embed = HookPoint()  # (batch, pos, d_model)
    module.pos_embed = PosEmbed(cfg) if cfg.positional in ("learned", "sinusoidal") else None
    if module.pos_embed is not None:
        module.hook_pos_embed = HookPoint()  # (batch, pos, d_model)
    module.rel_pos = RelativePositionBias(cfg, bidirectional=not causal) if cfg.positional == "relative" else None
    if module.rel_pos is not None:
        module.hook_position_bias = HookPoint()  # (1, n_heads, pos, k_pos), shared by the stack's layers
    module.token_type_embed = TokenTypeEmbed(cfg) if cfg.n_token_types else None
    if cfg.n_token_types:
        module.hook_token_type_embed = HookPoint()  # (batch, pos, d_model)
    module.ln_embed = make_norm(cfg) if cfg.embed_norm else nn.Identity()
    kinds = ["full" if cfg.window(i) is None else "sliding" for i in range(n_layers)]
    module.blocks = nn.ModuleList(
        Block(cfg, causal, cross, None if rotary is None else rotary[kind], cfg.window(i))
        for i, kind in enumerate(kinds)
    )
    # Post-norm blocks end normalised already; other stacks need a last norm before the head.
    module.ln_final = make_norm(cfg) if cfg.norm_position != "post" else nn.Identity()


def rotary_cells(cfg: Config) -> dict[str, Rotary] | None:
    """The rotary cell of full-attention layers and of sliding-window ones (the same one unless
    the sliding layers have their own base, unscaled, as in Gemma 3), each shared by its layers."""
    if cfg.positional != "rotary":
        return None
    full = Rotary(cfg)
    if cfg.rotary_base_local is None:
        return {"full": full, "sliding": full}
    local = Rotary(cfg, base=cfg.rotary_base_local, scaling={"type": "default"})
    return {"full": full, "sliding": local}


class Circuits:
    """`QK` and `OV` of every self-attention head of a stack, as TransformerLens' `model.QK`/`model.OV`."""

    def _circuit_blocks(self, name: str) -> nn.ModuleList:
        """The blocks whose self-attention `name` ("QK" or "OV") stacks."""
        return self.blocks

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q W_K^T of every self-attention head (n_layers, n_heads, d_model, d_model), factored:
        `QK[3, 5]` is layer 3's head 5. Biases, the score scale, q/k norms and rotary positions are
        left out (see `Attention.QK`)."""
        return stacked_circuit(self._circuit_blocks("QK"), "QK")

    @property
    def OV(self) -> FactoredMatrix:
        """W_V W_O of every self-attention head (n_layers, n_heads, d_model, d_model), factored:
        `OV[3, 5]` is layer 3's head 5. Biases are left out (see `Attention.OV`)."""
        return stacked_circuit(self._circuit_blocks("OV"), "OV")


def stacked_circuit(blocks: nn.ModuleList, name: str) -> FactoredMatrix:
    """Each block's self-attention `name` ("QK" or "OV"), stacked: (n_layers, n_heads, d_model, d_model)."""
    circuits = [getattr(block.attn, name) for block in blocks]
    return FactoredMatrix(torch.stack([c.A for c in circuits]), torch.stack([c.B for c in circuits]))


class Stack(Circuits, nn.Module):
    """The encoder or the decoder of an encoder-decoder model."""

    def __init__(
        self, cfg: Config, n_layers: int, causal: bool, cross: bool, rotary: dict[str, Rotary] | None
    ) -> None:
        super().__init__()
        add_stack(self, cfg, n_layers, causal, cross, rotary)


class Transformer(Circuits, TextIO, HookedRoot):
    """A transformer built from a `Config`; every intermediate is a named hook point."""

    def __init__(self, cfg: Config, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        rotary = rotary_cells(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        if cfg.arch == "encoder-decoder":
            self.encoder = Stack(cfg, cfg.n_layers, causal=False, cross=False, rotary=rotary)
            self.decoder = Stack(cfg, cfg.n_decoder_layers, causal=True, cross=True, rotary=rotary)
        else:
            add_stack(self, cfg, cfg.n_layers, causal=cfg.arch == "decoder", cross=False, rotary=rotary)
        self.unembed = Unembed(cfg, self.embed)
        self.pooler = Pooler(cfg) if cfg.pooler else None
        self.hook_logits = HookPoint()  # (batch, pos, d_vocab)
        self.tokenizer: TextTokenizer | None = None  # text in and out, when the checkpoint has one
        init_weights(self, seed)
        self.setup_hooks()

    def _circuit_blocks(self, name: str) -> nn.ModuleList:
        """This model's blocks; an encoder-decoder model has two stacks, so it names them instead."""
        if self.cfg.arch == "encoder-decoder":
            raise CircuitError(
                f"an encoder-decoder model has two stacks: ask model.encoder.{name} or model.decoder.{name} "
                f"(self-attention), or model.decoder.blocks[i].cross_attn.{name} (cross-attention, one layer)"
            )
        return self.blocks

    @classmethod
    def from_state(
        cls, cfg: Config, state: dict[str, Tensor], source: str, tokenizer: TextTokenizer | None = None
    ) -> Transformer:
        """A model around `state` (used as it is: no copy), checked against `cfg` first; eval mode."""
        with torch.device("meta"):
            model = cls(cfg)
        check_state(model.state_dict(keep_vars=True), state, source)
        model.load_state_dict(state, assign=True)
        model.tokenizer = tokenizer
        return model.eval()

    @classmethod
    def from_hf(cls, source: Any, allow_pickle: bool = False) -> Transformer:
        """Convert a `transformers` model, or a local Hugging Face directory, with the same numbers;
        a directory's tokenizer (tokenizer.json) comes along."""
        cfg, state, name = read_hf(source, allow_pickle)
        return cls.from_state(cfg, state, name, directory_tokenizer(source))

    @classmethod
    def from_gguf(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, weights: str = "dequantize"
    ) -> Transformer:
        """Open a GGUF file (llama.cpp's format), its tokenizer and chat template attached. `weights`:
        "dequantize" (to `dtype`) or "keep" (each quantized matrix stays low-bit: int4 or int8 per 32
        columns, see checkpoints/gguf_schemes.py; activations float32)."""
        if weights not in ("dequantize", "keep"):
            raise InputError(f'weights must be "dequantize" or "keep", got {weights!r}')
        if weights == "keep" and dtype != torch.float32:
            raise InputError(f'weights="keep" computes in float32; leave dtype at its default (got {dtype})')
        cfg, state, tokenizer, kinds = read_gguf(path, dtype)
        model = cls.from_state(cfg, state, str(path), tokenizer)
        return apply(model, gguf_plan(kinds, product_weights(model))) if weights == "keep" else model

    def quantize(self, scheme: str = "int8", group_size: int | str = 32, embeddings: str | None = None) -> Transformer:
        """`glassformer.quantize.quantize(self, …)`: every product weight stored in low bits, in place."""
        return quantize(self, scheme, group_size, embeddings)

    def float_state(self) -> dict[str, Tensor]:
        """`state_dict()` with every quantized weight as its float values: what checkpoints store."""
        return {name: dense(t) for name, t in self.state_dict().items()}

    def to_hf(self, directory: str | Path) -> Path:
        """Write this decoder (or T5-shaped encoder-decoder) as a Hugging Face checkpoint (GPT-2,
        Llama/Qwen2, GPT-NeoX, T5, … layout, whichever fits the config) that `transformers` opens with
        the same numbers."""
        directory = to_hf(self.cfg, self.float_state(), directory)
        if self.tokenizer is not None:
            self.tokenizer.save(directory)
        return directory

    def to_gguf(self, path: str | Path, dtype: str = "f32") -> Path:
        """Write this decoder (or T5-shaped encoder-decoder) as a GGUF file ("f32", "f16" or "q8_0" weights)
        that llama.cpp, Ollama and `transformers` open; the tokenizer and chat template go along when the model
        has one."""
        return write_gguf(self.cfg, self.float_state(), self.tokenizer, path, dtype)

    def save(self, directory: str | Path) -> Path:
        """Write `config.json`, `model.safetensors` (and the tokenizer files) into `directory`, each
        atomically. A model split by `glassformer.parallel` is gathered whole: every process of its
        group calls this, the first writes."""
        tp = getattr(self, "tp", None)
        state = self.float_state() if tp is None else tp.gather_state(self.cfg, self.state_dict())
        if tp is None or tp.rank == 0:
            write(self.cfg, state, directory)
            if self.tokenizer is not None:
                self.tokenizer.save(directory)
        return Path(directory)

    @classmethod
    def load(
        cls, directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> Transformer:
        """Open a directory written by `save` (weights memory-mapped, checked against the config),
        with its tokenizer when it has one."""
        cfg, state, source = read(directory)
        model = cls.from_state(cfg, state, source, directory_tokenizer(directory))
        return model.to(device=device, dtype=dtype)

    def forward(
        self,
        tokens: Tensor | Text,
        tgt: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits `(batch, pos, d_vocab)`; encoder-decoder: `model(src, tgt)`, logits over tgt positions.

        `attention_mask` (batch, pos) is 1 for real tokens and 0 for padding, as in Hugging Face.
        With padding, absolute and rotary positions count real tokens only, so a left-padded row
        computes what the same sequence computes alone. A string (or a list of strings, left-padded)
        is tokenized first, so `run_with_cache("text")` works too.
        """
        if is_text(tokens):
            if attention_mask is not None:
                raise InputError("give text or tokens with an attention_mask, not text with a mask")
            tokens, attention_mask = self.to_tokens(tokens, return_mask=True)
        if self.cfg.arch != "encoder-decoder":
            if tgt is not None or decoder_attention_mask is not None:
                raise InputError(f"a {self.cfg.arch} model takes one token tensor; tgt is for encoder-decoder")
            return self.hook_logits(self.unembed(self.encode(tokens, attention_mask, token_type_ids)))
        if tgt is None:
            raise InputError("an encoder-decoder model runs as model(src, tgt): pass the decoder tokens as tgt")
        src, src_mask = self._prepare(tokens, attention_mask, "src")
        tgt, tgt_mask = self._prepare(tgt, decoder_attention_mask, "tgt")
        encoder_out = self._run_stack(self.encoder, src, src_mask)
        resid = self._run_stack(self.decoder, tgt, tgt_mask, encoder_out, src_mask)
        return self.hook_logits(self.unembed(resid))

    def encode(
        self, tokens: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """The final residual stream `(batch, pos, d_model)` before the head; for an
        encoder-decoder model, the encoder's output that cross-attention reads."""
        stack = self.encoder if self.cfg.arch == "encoder-decoder" else self
        tokens, mask = self._prepare(tokens, attention_mask, "tokens")
        if token_type_ids is not None:
            if stack.token_type_embed is None:
                raise InputError("token_type_ids given, but this model has no token types (Config.n_token_types=0)")
            token_type_ids = check_tokens(token_type_ids, self.cfg, "token_type_ids", self.cfg.n_token_types)
            if token_type_ids.shape != tokens.shape:
                raise InputError(
                    f"token_type_ids {tuple(token_type_ids.shape)} must match tokens {tuple(tokens.shape)}"
                )
        return self._run_stack(stack, tokens, mask, token_type_ids=token_type_ids)

    def _prepare(self, tokens: Tensor, attention_mask: Tensor | None, name: str) -> tuple[Tensor, AttentionMask]:
        """Checked `(batch, pos)` token ids and their padding mask."""
        tokens = check_tokens(tokens, self.cfg, name)
        return tokens, AttentionMask(check_mask(attention_mask, tokens, f"the attention mask of {name}"))

    def _run_stack(
        self,
        stack: nn.Module,
        tokens: Tensor,
        mask: AttentionMask,
        encoder_out: Tensor | None = None,
        encoder_mask: AttentionMask | None = None,
        token_type_ids: Tensor | None = None,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        batch, pos = tokens.shape
        if positions is None and mask.key_valid is not None:  # count real tokens only
            positions = (mask.key_valid.cumsum(-1) - 1).clamp(min=0)
        resid = stack.hook_embed(self.embed(tokens))  # (batch, pos, d_model)
        if stack.pos_embed is not None:
            resid = resid + stack.hook_pos_embed(stack.pos_embed(positions, batch, pos))
        if stack.token_type_embed is not None:
            resid = resid + stack.hook_token_type_embed(stack.token_type_embed(token_type_ids, tokens))
        resid = self.drop(stack.ln_embed(resid))
        bias = None
        if stack.rel_pos is not None:  # queries at their slots, against every key slot (all cached ones)
            slots = torch.arange(pos, device=tokens.device) if mask.q_slots is None else mask.q_slots
            bias = stack.hook_position_bias(stack.rel_pos(slots, pos if cache is None else cache.visible()))
        for i, block in enumerate(stack.blocks):
            layer_cache = (None, None) if cache is None else (cache.layers[i], cache.cross[i])
            resid = block(resid, mask, positions, encoder_out, encoder_mask, *layer_cache, score_bias=bias)
        return stack.ln_final(resid)  # (batch, pos, d_model)

    def decode(
        self,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        encoder_out: Tensor | None = None,
        encoder_mask: AttentionMask | None = None,
    ) -> Tensor:
        """One generation step: `tokens (batch, pos)` at `positions (batch, pos)`, written into the
        KV cache at the slots `cache.advance` opened; returns the next-token logits (batch, d_vocab).

        No input checks here (this is the decode hot path): `generate` checks the prompt once.
        """
        stack = self.decoder if self.cfg.arch == "encoder-decoder" else self
        mask = AttentionMask(cache.key_valid[:, : cache.visible()], q_slots=cache.slots)
        resid = self._run_stack(stack, tokens, mask, encoder_out, encoder_mask, positions=positions, cache=cache)
        return self.hook_logits(self.unembed(resid[:, -1:]))[:, 0]  # only the last position is needed

    def generate(self, tokens: Tensor | Text, max_new_tokens: int, **options: Any) -> Any:
        """Prompt and new tokens together (batch, pos + new), as `transformers` returns them; given
        text, the text and its continuation (stopping at EOS). Options: see
        `glassformer.generate.generate` (sampling, EOS, padding, hooks, compile)."""
        if is_text(tokens):
            return generate_text(self, tokens, max_new_tokens, **options)
        return generate(self, tokens, max_new_tokens, **options)

    def stream(self, tokens: Tensor | Text, max_new_tokens: int, **options: Any) -> Iterator[Any]:
        """Yield each step's new tokens (batch,) as they are decoded, or, given text, the new text;
        options as for `generate`."""
        if is_text(tokens):
            return stream_text(self, tokens, max_new_tokens, **options)
        return stream(self, tokens, max_new_tokens, **options)

    def chat(self, messages: list[Message], max_new_tokens: int = 256, **sampling: Any) -> str:
        """The assistant's answer to a conversation, through the chat template; stops at its end of turn."""
        return chat(self, messages, max_new_tokens, **sampling)

    def chat_session(self, system: str | None = None, **sampling: Any) -> ChatSession:
        """A multi-turn conversation that keeps its KV cache between turns (`send(text)` streams)."""
        return ChatSession(self, system, **sampling)


@torch.no_grad()
def init_weights(model: Transformer, seed: int | None = None) -> None:
    """GPT-2 initialisation: N(0, init_std) matrices, zero biases, unit norm gains; the projections
    that write into the residual stream (W_O, W_out) scaled by 1/sqrt(number of such writes)."""
    cfg = model.cfg
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    layers = cfg.n_layers + (cfg.n_decoder_layers if cfg.arch == "encoder-decoder" else 0)
    writes = layers * (1 if cfg.attn_only else 2)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if param.is_meta:  # built to receive checkpoint weights: nothing to initialise
            continue
        if leaf == "w":  # norm gains
            param.fill_(1.0)
        elif param.dim() == 1:  # every other vector is a bias
            param.zero_()
        else:
            std = cfg.init_std / math.sqrt(writes) if leaf in ("o_weight", "out_weight") else cfg.init_std
            param.copy_(torch.randn(param.shape, generator=generator) * std)
