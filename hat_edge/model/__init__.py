"""Weight-sharing SuperTransformer, standalone SubTransformer, and decoding (see each module)."""

from hat_edge.model.super import ModelConfig, SuperTransformer
from hat_edge.model.sub import SubTransformer

__all__ = ["ModelConfig", "SuperTransformer", "SubTransformer"]
