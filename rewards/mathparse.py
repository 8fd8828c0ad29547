"""Where the bounded parser used to live; it is now `rewards.math.parser` (this name stays importable)."""

from rewards.math.normalize import normalize, tokenize
from rewards.math.parser import parse_answer
from rewards.math.values import (
    MAX_CHARS,
    Answer,
    Interval,
    Matrix,
    ParseError,
    PlusMinus,
    Relation,
    Seq,
    Text,
    TooBig,
    Union,
)

__all__ = ["MAX_CHARS", "Answer", "Interval", "Matrix", "ParseError", "PlusMinus", "Relation", "Seq", "Text",
           "TooBig", "Union", "normalize", "parse_answer", "tokenize"]
