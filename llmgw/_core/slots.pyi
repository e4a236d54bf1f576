"""Types of the compiled per-member slot table (slots.pyx): its whole API is C-level (slots.pxd)."""

from typing_extensions import disjoint_base

@disjoint_base
class MemberSlots: ...
