"""Our causal attention inside Hugging Face transformers models (optional: transformers is not a
requirement of this package; this module imports it when register() runs; `pip install
"lecture-flash[hf]"` installs it). Tested with transformers 4.57.6, 5.0.0 and 5.25.0
(TESTED_TRANSFORMERS); 4.53.3 lacks what tests/test_hf.py uses.

    import lecture_flash.hf
    name = lecture_flash.hf.register()                       # "lecture_causal"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)

register() puts two functions in transformers' registries under one name: the attention function
(AttentionInterface) and the mask function (AttentionMaskInterface) that decides what the
attention function is handed. The name must not contain "flash": transformers takes such names
for kernels to fetch from its hub.

What each call gets, and what runs:
- No padding, every cache slot up to the last query filled (training, a dynamic cache): no mask,
  and causal_attention runs on the heads as they come (grouped key/value heads read in place).
- A static cache (a fixed number of slots, the last ones still empty): the mask function
  passes the (B, used slots) key mask, and the empty slots are cut off (the queries are the
  last positions of the used ones, bottom-right as causal_attention aligns them).
- Padding (a 2-D attention_mask with zeros, left or right or anywhere): the same key mask;
  the real positions are packed into sequences (cu_seqlens) and the padded query rows get
  zeros, as flash-attn's integration in transformers does. Finding them reads the mask on the
  host (one device sync per forward: the layers share the mask tensor, which keeps them), so
  this path cannot be captured in a CUDA graph.
- Any mask transformers builds from something else (a custom mask_function: packed sequences
  found from position_ids, prefix-LM overlays, chunked attention): the dense mask, handed to
  transformers' own SDPA function, with a warning once per process.
- Sliding-window layers (Mistral, Gemma) pass sliding_window: window=(sliding_window - 1, 0).
- Gemma 2's attention logit softcapping (softcap) and gpt-oss's sinks (s_aux): passed on.
- Dropout (module.training with attention dropout), `scaling`, output_attentions (no weights
  are returned, as with "sdpa").
"""
import warnings

import torch

from .dispatch import causal_attention

NAME = "lecture_causal"
# The transformers releases tests/test_hf.py has passed with; setup.py's hf extra spans them.
TESTED_TRANSFORMERS = ("4.57.6", "5.0.0", "5.25.0")
_WARNED = set()


def _interfaces():
    """transformers' (AttentionInterface, AttentionMaskInterface), or an ImportError that names
    the real cause: transformers missing, or present and failing to import (the chained
    exception), or a `kernels` that is not Hugging Face's shadowing theirs."""
    tested = ", ".join(TESTED_TRANSFORMERS)
    try:
        import transformers
    except ModuleNotFoundError as e:
        if e.name != "transformers":
            raise
        raise ImportError(f"lecture_flash.hf needs transformers (pip install 'lecture-flash[hf]'; "
                          f"tested with {tested})") from None
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        import sys
        found = f"transformers {transformers.__version__} ({transformers.__file__})"
        theirs = sys.modules.get("kernels")
        if theirs is not None and not hasattr(theirs, "get_kernel"):
            found += (f"; the `kernels` it imported, {getattr(theirs, '__file__', theirs)}, is not "
                      "Hugging Face's: a folder named kernels/ on sys.path shadows it")
        raise ImportError(f"lecture_flash.hf could not import transformers' attention interface "
                          f"from {found} (tested with {tested}): {type(e).__name__}: {e}") from e
    return AttentionInterface, AttentionMaskInterface


def register(name=NAME, backend="auto"):
    """Register the attention and mask functions under `name` and return it, to pass as
    `attn_implementation` (from_pretrained, or model.set_attn_implementation). backend: what
    causal_attention runs ("auto": the Triton kernel on CUDA)."""
    if "flash" in name:
        raise ValueError(f"name must not contain 'flash' (transformers fetches such names from "
                         f"its hub as kernels), got {name!r}")
    AttentionInterface, AttentionMaskInterface = _interfaces()

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, scaling, dropout,
                                 backend=backend, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, key_mask)
    return name


def key_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
             mask_function=None, attention_mask=None, local_size=None, cache_position=None,
             **kwargs):
    """The mask function: None (every key up to the last query is real), a (B, used) bool key
    mask (True: a real key; the queries are the last q_length of the `used` positions), or,
    for a mask_function other than the causal (or sliding-window causal) one, transformers'
    dense SDPA mask. Takes the arguments of transformers' sdpa_mask (q_offset; older versions
    pass cache_position instead)."""
    from transformers import masking_utils as mu

    kwargs.pop("allow_is_causal_skip", None)
    refuse_unsupported(kwargs.get("config"))
    if not _causal(mask_function, local_size):
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                            q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                            attention_mask=attention_mask, local_size=local_size,
                            cache_position=cache_position, allow_is_causal_skip=False, **kwargs)
    if cache_position is not None:  # transformers < 5: the queries' positions
        q_length = cache_position.shape[0]
        end = int(cache_position[-1]) + 1
    else:
        end = int(q_offset) + q_length  # q_offset is a tensor for static caches
    used = end - kv_offset  # key slots holding a position up to the last query's
    if attention_mask is not None and kv_offset > 0 and attention_mask.shape[-1] == used:
        # Our own (B, used) mask coming back (generate prepares the masks once and hands them
        # to the forward, which asks again): a user's mask spans every position from 0, which
        # is more than `used` once the cache slides. Slicing it again would leave nothing.
        attention_mask = attention_mask.to(torch.bool)
        return None if used == kv_length and bool(attention_mask.all()) else attention_mask
    if attention_mask is not None:
        attention_mask = attention_mask.to(torch.bool)[:, kv_offset:end]
        if attention_mask.shape[1] < used:  # positions past the 2-D mask count as real
            attention_mask = torch.nn.functional.pad(attention_mask, (0, used - attention_mask.shape[1]),
                                                     value=True)
        if used == kv_length and bool(attention_mask.all()):
            return None
        return attention_mask
    if used == kv_length:
        return None
    device = cache_position.device if cache_position is not None else kwargs.get("device")
    return torch.ones(batch_size, used, dtype=torch.bool, device=device)


# What the attention function may be passed: honoured here (sliding_window, softcap: Gemma 2's
# logit softcapping, s_aux: gpt-oss's sinks), or transformers' own bookkeeping that changes
# nothing about attention. Any other argument with a value is refused.
_UNDERSTOOD = {"sliding_window", "is_causal", "position_ids", "use_cache", "output_attentions",
               "output_router_logits", "cache_position", "past_key_values", "layer_idx"}
_UNSUPPORTED_ARGS = {"head_mask": "a head mask (head_mask)"}


def refuse_unsupported(config):
    """Raise NotImplementedError, one line naming the feature, for a model whose attention
    lecture_flash.hf cannot compute as the model defines it: its attention code does not go
    through transformers' attention interface (MPT, Bloom, Falcon: their own code, ALiBi)."""
    if config is None:
        return
    model = _causal_lm_class(config)
    if model is not None and not getattr(model, "_supports_attention_backend", True):
        raise NotImplementedError(
            f"{model.__name__} computes attention in its own code, not through transformers' "
            "attention interface: lecture_flash.hf cannot serve it (attn_implementation='sdpa' "
            "or 'eager')")


def _causal_lm_class(config):
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        import transformers
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
        return getattr(transformers, name, None) if name else None
    except ImportError:
        return None


def _causal(mask_function, local_size):
    """Whether transformers asks for the plain causal mask (or its sliding-window form over
    local_size keys): mask_function probed on a small grid of positions, as its own mask
    builders call it, against that pattern. Anything else (a function that reads tensors of its
    own, such as packed sequences' document ids, or an overlay) is not ours to take."""
    if mask_function is None:
        return True
    n = 2 * (local_size or 4) + 3
    q, kv = torch.arange(n).view(n, 1), torch.arange(n).view(1, n)
    want = kv <= q
    if local_size is not None:
        want &= kv > q - local_size
    try:
        got = mask_function(torch.tensor(0), torch.tensor(0), q, kv)
        return isinstance(got, torch.Tensor) and torch.equal(got.expand(n, n).bool(), want)
    except Exception:  # it indexes something of its own: not the plain pattern
        return False


def _causal_call(module, query, attention_mask, is_causal):
    """Whether transformers asks for causal self-attention. The module says so (is_causal, and
    no cross-attention). The is_causal argument means two things: transformers 5 passes the
    model's intent (False: full attention), 4.x's GPT-2 the flag its SDPA call would take, which
    is False whenever a mask is given or there is one query (and then says nothing of the
    module), so there only False with neither is full attention."""
    if not getattr(module, "is_causal", True) or getattr(module, "is_cross_attention", False):
        return False
    if is_causal is False:
        import transformers
        full = int(transformers.__version__.split(".")[0]) >= 5
        return not (full or (attention_mask is None and query.shape[2] > 1))
    return True


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      backend="auto", sliding_window=None, is_causal=None, softcap=None,
                      s_aux=None, **kwargs):
    """transformers' attention-function contract: query (B, H, Tq, D), key and value (B, Hk,
    Tk, D); returns ((B, Tq, H, D), None). softcap: Gemma 2's attention logit softcapping;
    s_aux: gpt-oss's sinks, one logit per query head."""
    if not _causal_call(module, query, attention_mask, is_causal):
        raise ValueError(f"{type(module).__name__} is not causal attention; lecture_flash.hf runs "
                         "causal attention only (use attn_implementation='sdpa' for this model)")
    for arg, given in kwargs.items():  # nothing accepted and ignored
        if given is None or arg in _UNDERSTOOD:
            continue
        feature = _UNSUPPORTED_ARGS.get(arg, f"the argument {arg!r}")
        raise NotImplementedError(f"{type(module).__name__} passes {feature}, which "
                                  "lecture_flash.hf does not implement (attn_implementation="
                                  "'sdpa' or 'eager')")
    window = None if sliding_window is None else (int(sliding_window) - 1, 0)
    options = dict(scale=scaling, dropout_p=float(dropout), backend=backend, window=window,
                   softcap=float(softcap or 0.0), sinks=s_aux)
    if attention_mask is not None and attention_mask.dim() != 2:  # key_mask gave a dense mask
        if softcap or s_aux is not None:  # transformers' SDPA function would drop them
            raise NotImplementedError(f"{type(module).__name__} passes a custom mask with "
                                      f"{'softcapping' if softcap else 'sinks'}, which "
                                      "lecture_flash.hf does not implement (attn_implementation="
                                      "'eager')")
        return _transformers_sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if attention_mask is not None:
        used = attention_mask.shape[1]
        key, value = key[:, :, :used], value[:, :, :used]  # a static cache's empty slots: gone
        if not bool(attention_mask.all()):
            return _padded(query, key, value, attention_mask, options), None
    return causal_attention(query, key, value, **options).transpose(1, 2), None


def _padded(query, key, value, mask, options):
    """Attention of a batch whose keys have holes (padding): the real positions packed into one
    sequence per row (bottom-right within each: a query sees the real keys up to its own
    position), padded query rows zero. (B, Tq, H, D)."""
    B, H, Tq, D = query.shape
    used = mask.shape[1]
    rows_q, rows_k, packed_rows = _packing(mask, Tq)
    packed = causal_attention(
        query.transpose(1, 2).reshape(B * Tq, H, D)[rows_q],
        key.transpose(1, 2).reshape(B * used, key.shape[1], D)[rows_k],
        value.transpose(1, 2).reshape(B * used, value.shape[1], D)[rows_k], **packed_rows,
        **options)
    out = query.new_zeros(B * Tq, H, D).index_copy(0, rows_q, packed)
    return out.view(B, Tq, H, D)


def _packing(mask, Tq):
    """(query rows, key rows, the cu_seqlens arguments) that pack the real positions of a
    (B, used) key mask whose last Tq positions are the queries. Finding them reads the mask on
    the host, once per forward: every layer gets the same mask tensor, which keeps them."""
    kept = getattr(mask, "_lecture_flash_packing", None)
    if kept is not None and kept[0] == Tq:
        return kept[1]
    q_mask = mask[:, mask.shape[1] - Tq:]
    rows_k, rows_q = mask.reshape(-1).nonzero().squeeze(1), q_mask.reshape(-1).nonzero().squeeze(1)
    lengths_k, lengths_q = mask.sum(1, dtype=torch.int32), q_mask.sum(1, dtype=torch.int32)
    cu_k, cu_q = (torch.nn.functional.pad(n.cumsum(0, dtype=torch.int32), (1, 0))
                  for n in (lengths_k, lengths_q))
    packing = (rows_q, rows_k, dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                    max_seqlen_q=int(lengths_q.max()),
                                    max_seqlen_k=int(lengths_k.max())))
    mask._lecture_flash_packing = (Tq, packing)
    return packing


def _transformers_sdpa(module, query, key, value, mask, scaling, dropout, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    why = "a mask other than causal with padding (a custom mask_function)"
    if why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"lecture_flash.hf: {why} goes to transformers' SDPA attention", stacklevel=3)
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling,
                                  dropout=dropout, **kwargs)
