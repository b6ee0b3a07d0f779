"""ModelConfig: the model's shape, read from a Hugging Face `config.json` (model_type llama or mistral).

Every setting that changes what the network computes is either supported here or refused with an error
naming it: silently ignoring, say, attention biases would give a model that loads and computes garbage.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from minift.errors import MinifTError

SUPPORTED_TYPES = ("llama", "mistral")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096  # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None -> n_heads (plain multi-head attention)
    head_dim: int | None = None  # None -> dim // n_heads
    hidden_dim: int = 11008  # intermediate_size of the SwiGLU MLP
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or the llama3 parameters (factor, low/high_freq_factor, original_max)
    max_seq_len: int = 4096
    sliding_window: int | None = None  # Mistral: attend only to the last `sliding_window` positions
    tie_embeddings: bool = False
    model_type: str = "llama"
    extra: dict = field(default_factory=dict, repr=False)  # the original config.json, written back by save_hf

    def __post_init__(self):
        if self.model_type not in SUPPORTED_TYPES:
            raise MinifTError(f"unsupported model_type {self.model_type!r} (supported: {', '.join(SUPPORTED_TYPES)})")
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise MinifTError(f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") != "llama3":
            raise MinifTError(f"unsupported rope scaling {self.rope_scaling.get('rope_type')!r} (supported: default, llama3)")

    @classmethod
    def from_hf(cls, path) -> "ModelConfig":
        """Read `config.json` (a file or the directory holding it)."""
        path = Path(path)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise MinifTError(f"{path}: no config.json")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise MinifTError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        return cls.from_hf_dict(hf, source=str(path))

    @classmethod
    def from_hf_dict(cls, hf: dict, source="config.json") -> "ModelConfig":
        def need(key):
            if key not in hf:
                raise MinifTError(f"{source}: missing field {key!r}")
            return hf[key]

        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_TYPES:
            raise MinifTError(f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_TYPES)})")
        # Settings our network does not have: refuse rather than compute something else.
        for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
            if hf.get(key, ok) != ok:
                raise MinifTError(f"{source}: unsupported {key}={hf[key]!r} (minift supports {key}={ok!r})")
        # RoPE: transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise MinifTError(f"{source}: unsupported partial_rotary_factor={rope['partial_rotary_factor']}")
        if rope_type not in ("default", "llama3"):
            raise MinifTError(f"{source}: unsupported rope scaling {rope_type!r} (supported: default, llama3)")
        scaling = None
        if rope_type == "llama3":
            scaling = {"rope_type": "llama3", "factor": float(rope["factor"]),
                       "low_freq_factor": float(rope["low_freq_factor"]),
                       "high_freq_factor": float(rope["high_freq_factor"]),
                       "original_max_position_embeddings": int(rope["original_max_position_embeddings"])}
        window = hf.get("sliding_window") if model_type == "mistral" else None  # Mistral <- difference from Llama
        if hf.get("use_sliding_window") is False:
            window = None
        return cls(
            vocab_size=need("vocab_size"), dim=need("hidden_size"), n_layers=need("num_hidden_layers"),
            n_heads=need("num_attention_heads"), n_kv_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"), hidden_dim=need("intermediate_size"), norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta), rope_scaling=scaling, max_seq_len=hf.get("max_position_embeddings", 4096),
            sliding_window=window, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            model_type=model_type, extra=hf,
        )

    def to_hf_dict(self) -> dict:
        """The config.json that transformers reads back (starting from the original file's fields)."""
        hf = dict(self.extra)
        hf.update(model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.dim,
                  num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                  num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim, intermediate_size=self.hidden_dim,
                  rms_norm_eps=self.norm_eps, max_position_embeddings=self.max_seq_len,
                  tie_word_embeddings=self.tie_embeddings, hidden_act="silu")
        hf.setdefault("architectures", ["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"])
        hf.pop("rope_scaling", None)
        hf["rope_theta"] = self.rope_theta
        hf["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})}
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        return hf
