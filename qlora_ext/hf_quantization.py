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
