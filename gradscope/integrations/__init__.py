"""gradscope where users already train: a Lightning Callback (`.lightning`), a transformers
TrainerCallback (`.transformers`) and a TensorBoard export (`.tensorboard`). Each module is
imported only when used; the headline scalars they log come from `headline`."""

from gradscope.integrations.headline import SEVERITY_LEVEL, headline

__all__ = ["SEVERITY_LEVEL", "headline"]
