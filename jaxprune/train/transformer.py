"""Moved to :mod:`jaxprune.models.decoder`; these names stay importable from here."""

from jaxprune.models.decoder import MLP, Attention, Block, CharLM, rotary

__all__ = ["Attention", "Block", "CharLM", "MLP", "rotary"]
