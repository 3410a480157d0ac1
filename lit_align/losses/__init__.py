"""Pure loss functions: tensors and hyper-parameters in, a loss and detached metrics out; one
function per variant, chosen from a dict keyed by the variant's name. No models, batches of text or
Lightning here."""
