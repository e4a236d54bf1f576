"""Resilience policies the gateway consults per request: circuit breaking with outlier ejection, and hedging.

Sans-IO: each policy takes an injected clock and never sleeps, spawns tasks or touches the network, so the gateway
wires it in with a few calls and tests drive it with a fake clock. See docs/resilience.md.
"""

from llmgw.policy.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerBoard,
    BreakerConfig,
)
from llmgw.policy.hedging import HEDGE_CANCELLED, HEDGE_LOST, HEDGE_WON, HedgeConfig, HedgePolicy
from llmgw.policy.outliers import LatencyOutliers, OutlierConfig

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "HEDGE_CANCELLED",
    "HEDGE_LOST",
    "HEDGE_WON",
    "OPEN",
    "BreakerBoard",
    "BreakerConfig",
    "HedgeConfig",
    "HedgePolicy",
    "LatencyOutliers",
    "OutlierConfig",
]
