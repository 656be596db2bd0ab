"""What transformers remembers of a quantized load (GGUF, bitsandbytes), and forgetting it once the model is
dense again (the GGUF model cache, merge_and_unload): duck-typed, so transformers is never imported here."""
from torch import nn


def forget_quantization(model: nn.Module) -> None:
    """Makes transformers treat a model it loaded quantized (GGUF, bitsandbytes) as the dense model it now is: no
    quantization config saved with it, no quantizer, no refusal to cast its dtype."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # save_pretrained reverses the weight conversions of the load: drop the quantizer's own (deserializing
        # its packed weights), which have no reverse and no longer apply
        conversions = getattr(model, "_weight_conversions", None)
        if conversions and hasattr(quantizer, "get_weight_conversions"):
            added = {(tuple(c.source_patterns), tuple(c.target_patterns)) for c in quantizer.get_weight_conversions()}
            model._weight_conversions = [c for c in conversions
                                         if (tuple(c.source_patterns), tuple(c.target_patterns)) not in added]
        model.hf_quantizer = None
    for name in ("quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if name in vars(model):
            delattr(model, name)
    if "is_quantized" in vars(model):   # set by the quantizer; .half() and .float() refuse while it is True
        model.is_quantized = False


def mark_quantized(model: nn.Module, quantized: bool) -> None:
    """Sets (or removes) transformers' mark of a quantized model, `config._is_quantized`, on the config of the model
    and of every model inside it (a composite model's language model has its own), as transformers' quantizers
    do. transformers never saves it; its flash-attention path then casts float32 queries to the config's dtype
    instead of looking for an nn.Linear in the attention module, which a 4-bit attention has none of."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "to_dict"):   # (a transformers config)
            continue
        if quantized:
            config._is_quantized = True
        elif "_is_quantized" in vars(config):
            del config._is_quantized
