"""Types of the compiled Lifeguard suspicion timer (suspicion.pyx)."""

from typing_extensions import disjoint_base

@disjoint_base
class Suspicion:
    incarnation: int
    start: float
    min_timeout: float
    max_timeout: float
    deadline: float
    k: int
    confirmers: set[str]
    def __init__(
        self, incarnation: int, start: float, min_timeout: float, max_timeout: float, k: int, first_reporter: str
    ) -> None: ...
    def confirmations(self) -> int: ...
    def timeout(self) -> float: ...
    def confirm(self, reporter: str) -> bool: ...
