"""Weight-sharing SuperTransformer, standalone SubTransformer, and decoding (see each module)."""

from hat_edge.model.config import ModelConfig
from hat_edge.model.sub import SubTransformer
from hat_edge.model.super import SuperTransformer

__all__ = ["ModelConfig", "SuperTransformer", "SubTransformer"]
