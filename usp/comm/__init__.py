"""Communication building blocks: P2P ring rotation and the Ulysses all-to-all."""
from .all_to_all import all_to_all_heads_to_seq, all_to_all_seq_to_heads
from .p2p import RingRotation

__all__ = ["RingRotation", "all_to_all_seq_to_heads", "all_to_all_heads_to_seq"]
