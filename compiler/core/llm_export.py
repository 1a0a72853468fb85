"""A Hugging Face Llama-style checkpoint folder -> one ONNX decoder step with a KV cache.

``MODEL_DIR`` is what ``save_pretrained`` writes (``config.json`` + weights); nothing is
fetched from the network. The exported graph is one decoder step, used for prefill (many
new tokens) and for decoding (one)::

    inputs   input_ids      int64 [1, seq]          the new tokens
             position_ids   int64 [1, seq]          their positions (past length + 0..seq-1)
             past_mask      int64 [1, past]         1: a cached slot to attend, 0: one to skip
             past_key_L     float32 [1, kv_heads, head_dim, past]   (each layer L; K^T)
             past_value_L   float32 [1, kv_heads, past, head_dim]
    outputs  logits         float32 [1, seq, vocab]
             new_key_L      float32 [1, kv_heads, head_dim, seq]    the new tokens' keys
             new_value_L    float32 [1, kv_heads, seq, head_dim]    and values

The step returns only the new tokens' keys and values; the caller writes them into its
cache (kiln.compiler.driver.generate keeps one buffer per input with spare slots and
writes one column a token: no copy of the whole cache per token). Keys are stored
transposed, as ``q K^T`` reads them, so no step transposes the cache. ``past`` may count
spare slots not filled yet: ``past_mask`` 0 skips them (their contents must be finite).

``seq`` is 1..``max_seq`` and ``past`` 1..``max_seq`` - 1 (symbolic dims, recorded as the
model's ``kiln.dims``). A prompt starts with one masked slot (``past_mask = [[0]]``, zero
keys and values) rather than an empty cache, so that no dimension is ever 0; the slot gets
no attention weight (its bias is the most negative float32, ``exp`` of which is 0).

Why a wrapper rather than exporting ``LlamaForCausalLM.forward``: its mask and cache code
computes shapes at run time (``Shape -> Squeeze -> Add -> Range -> Expand``) that TVM's
importer cannot keep symbolic. The wrapper calls the checkpoint's own modules (embedding,
RMSNorms, projections, SwiGLU MLPs, rotary embedding, head) and writes attention itself
with no shape arithmetic::

    q, k, v = rope(x Wq), rope(x Wk), x Wv            heads: q [1, KV, G, seq, D], G = H / KV
    s_past  = q past_key * scale + [past_mask ? 0 : MIN]            [seq, past]
    s_new   = q k^T * scale + [pos_j <= pos_i ? 0 : MIN]            [seq, seq]
    y       = softmax over both parts (one max, one sum) times (past_value | v)
              (grouped-query: the cache broadcast over G; new_key_L = k^T, new_value_L = v)

The causal part compares the new tokens' own positions, so no ``Range`` is needed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from kiln.compiler.core.errors import FrontendError

logger = logging.getLogger(__name__)

#: metadata key of the decoder's layout (JSON, :class:`DecoderLayout`)
LLM_KEY = "kiln.llm"
#: metadata key of the symbolic dims' ranges (kiln.compiler.driver.symbolic.DIMS_KEY)
DIMS_KEY = "kiln.dims"
#: the longest sequence (past + new) an export serves unless told otherwise
DEFAULT_MAX_SEQ = 2048
SUPPORTED_TYPES = ("llama",)


@dataclass(frozen=True)
class DecoderLayout:
    """What a generation loop needs to know about an exported decoder step."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_seq: int

    def past_names(self) -> list[str]:
        return [f"past_{kind}_{i}" for i in range(self.layers) for kind in ("key", "value")]

    def new_names(self) -> list[str]:
        """The outputs: the new tokens' keys ``[1, kv_heads, head_dim, seq]`` and values
        ``[1, kv_heads, seq, head_dim]``, to be written into the cache by the caller."""
        return [f"new_{kind}_{i}" for i in range(self.layers) for kind in ("key", "value")]

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DecoderLayout:
        return cls(**json.loads(text))


def is_llm_folder(path: Path) -> bool:
    """A folder holding a Hugging Face ``config.json`` (what ``save_pretrained`` writes)."""
    return path.is_dir() and (path / "config.json").is_file()


def _config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise FrontendError(f"{path}/config.json: not readable JSON ({error})") from None
    kind = config.get("model_type")
    if kind not in SUPPORTED_TYPES:
        raise FrontendError(f"{path}: model_type {kind!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_TYPES)})")
    return config


def load_causal_lm(path: str | Path):
    """The checkpoint as a float32 ``transformers`` model in eval mode (local files only)."""
    path = Path(path)
    _config(path)
    try:
        import torch
        import transformers
    except ImportError:
        raise FrontendError(f"{path}: a checkpoint folder needs torch and transformers "
                            "(pip install 'kiln[llm]')") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, local_files_only=True, attn_implementation="eager")
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise FrontendError(f"{path}: transformers cannot load it "
                            f"({type(error).__name__}: {first})") from error
    return model.eval()


def layout_of(model, max_seq: int = DEFAULT_MAX_SEQ) -> DecoderLayout:
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return DecoderLayout(layers=config.num_hidden_layers, kv_heads=config.num_key_value_heads,
                         head_dim=head_dim, vocab=config.vocab_size, max_seq=max_seq)


def decoder_step(model):
    """An ``nn.Module`` computing one decoder step of ``model`` (see the module docstring)."""
    import torch
    from torch import nn

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = layout_of(model).head_dim
    if heads % kv_heads:
        raise FrontendError(f"{heads} attention heads for {kv_heads} key/value heads")
    groups = heads // kv_heads
    lowest = torch.finfo(torch.float32).min

    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + turned * sin

    class DecoderStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def attention(self, layer, x, cos, sin, past_bias, new_bias, past_k, past_v):
            attn = layer.self_attn
            q = attn.q_proj(x).reshape(1, -1, kv_heads, groups, head_dim).permute(0, 2, 3, 1, 4)
            k = attn.k_proj(x).reshape(1, -1, kv_heads, head_dim).transpose(1, 2)
            v = attn.v_proj(x).reshape(1, -1, kv_heads, head_dim).transpose(1, 2)
            q = rotate(q, cos[:, None, None], sin[:, None, None])
            k = rotate(k, cos[:, None], sin[:, None]).transpose(-1, -2)   # [1, KV, D, seq]
            # the cache's K is stored [1, KV, D, past] (what q K^T reads): no transpose of
            # the cache, and no concatenation: the past and the new tokens are scored apart
            # and share one softmax (max and sum over both parts)
            s_past = torch.matmul(q, past_k.unsqueeze(2)) * attn.scaling + past_bias
            s_new = torch.matmul(q, k.unsqueeze(2)) * attn.scaling + new_bias
            top = torch.maximum(s_past.amax(-1, keepdim=True), s_new.amax(-1, keepdim=True))
            e_past, e_new = torch.exp(s_past - top), torch.exp(s_new - top)
            total = e_past.sum(-1, keepdim=True) + e_new.sum(-1, keepdim=True)
            y = (torch.matmul(e_past, past_v.unsqueeze(2))
                 + torch.matmul(e_new, v.unsqueeze(2))) / total          # [1, KV, G, seq, D]
            y = y.permute(0, 3, 1, 2, 4).reshape(1, -1, heads * head_dim)
            return attn.o_proj(y), k, v

        def forward(self, input_ids, position_ids, past_mask, *past):
            inner = self.lm.model
            x = inner.embed_tokens(input_ids)
            cos, sin = inner.rotary_emb(x, position_ids)            # [1, seq, D]
            # biases: masked past slots [1, 1, 1, seq, past], causal new tokens [seq, seq]
            zero = position_ids[0, :, None].to(torch.float32) * 0.0        # [seq, 1], no Shape op
            past_bias = (torch.where(past_mask[0] > 0, 0.0, lowest)[None, :] + zero)[None, None, None]
            pos = position_ids[0]
            new_bias = torch.where(pos[None, :] <= pos[:, None], 0.0, lowest)
            news = []
            for i, layer in enumerate(inner.layers):
                h, keys, values = self.attention(layer, layer.input_layernorm(x), cos, sin,
                                                 past_bias, new_bias, past[2 * i], past[2 * i + 1])
                x = x + h
                x = x + layer.mlp(layer.post_attention_layernorm(x))
                news += [keys, values]
            return (self.lm.lm_head(inner.norm(x)), *news)

    return DecoderStep().eval()


def example_inputs(layout: DecoderLayout, seq: int = 3, past: int = 2):
    import torch

    kv = [torch.zeros(1, layout.kv_heads, *((layout.head_dim, past) if name.startswith("past_key")
                                            else (past, layout.head_dim)))
          for name in layout.past_names()]
    return (torch.zeros(1, seq, dtype=torch.int64),
            torch.arange(past, past + seq, dtype=torch.int64)[None],
            torch.ones(1, past, dtype=torch.int64), *kv)


def export_decoder(path: str | Path, *, max_seq: int = DEFAULT_MAX_SEQ) -> ir.Model:
    """Export the checkpoint folder's decoder step to ONNX (symbolic ``seq`` and ``past``)."""
    import torch

    path = Path(path)
    if max_seq < 2:
        raise FrontendError(f"{path}: max_seq must be at least 2, got {max_seq}")
    model = load_causal_lm(path)
    layout = layout_of(model, max_seq)
    step = decoder_step(model)
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    past = torch.export.Dim("past", min=1, max=max_seq - 1)
    dynamic = {"input_ids": {1: seq}, "position_ids": {1: seq}, "past_mask": {1: past},
               "past": tuple({3 if name.startswith("past_key") else 2: past}
                             for name in layout.past_names())}
    names = ["input_ids", "position_ids", "past_mask", *layout.past_names()]
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(step, example_inputs(layout), dynamo=True,
                                        dynamic_shapes=dynamic, input_names=names,
                                        output_names=["logits", *layout.new_names()],
                                        optimize=True, verbose=False)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise FrontendError(f"{path}: exporting the decoder step failed "
                            f"({type(error).__name__}: {first})") from error
    if program is None:
        raise FrontendError(f"{path}: exporting the decoder step produced no ONNX program")
    onnx_model = program.model
    onnx_model.metadata_props[LLM_KEY] = layout.to_json()
    onnx_model.metadata_props[DIMS_KEY] = json.dumps(
        {"past": [1, max_seq - 1], "seq": [1, max_seq]}, sort_keys=True)
    return onnx_model
