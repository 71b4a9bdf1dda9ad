"""The choices a compression config offers, defined once: string enums that print, compare and serialise as their
values (`Method.whiten == "whiten"`, `f"{Method.whiten}" == "whiten"`, JSON writes "whiten"), so configs read from
JSON or typed by a user are the same objects as those the code compares against."""

from __future__ import annotations

import enum


class Option(str, enum.Enum):
    """A str enum whose str / format / repr are its value's (error messages and JSON read as before)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def values(cls) -> list[str]:
        return [member.value for member in cls]

    @classmethod
    def parse(cls, value, where: str, field: str):
        """`value` as a member; ValueError naming `where`, the field, the value and the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{where}: {field}={value!r} must be one of {cls.values()}") from None


class Method(Option):
    """The decomposition of a low-rank method (the S of the whitened SVD, `algorithms.lowrank`)."""

    svd = "svd"
    asvd = "asvd"
    whiten = "whiten"


class Allocator(Option):
    """How LowRankConfig spreads the parameter budget over layers (`configs.LowRankConfig`)."""

    uniform = "uniform"
    loss = "loss"
    sensitivity = "sensitivity"
    fisher = "fisher"


class Residual(Option):
    """The norm a low-rank residual is fitted in (`algorithms.eora`)."""

    eora = "eora"
    svd = "svd"
    lqer = "lqer"


class SharedDim(Option):
    """Which channels share a codebook in SWSC (`formats`)."""

    rows = "rows"
    columns = "columns"


class BasisScore(Option):
    """How basis selection scores a basis on target data (`algorithms.basis_selection`)."""

    energy = "energy"
    taylor = "taylor"
    fisher = "fisher"


class Device(Option):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
