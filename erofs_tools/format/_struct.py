"""A tiny declarative base for fixed-size little-endian records."""
from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

from erofs_tools.errors import CorruptImageError

R = TypeVar("R", bound="Record")
Buffer = bytes | bytearray | memoryview


class Record:
    """Subclasses set FIELDS = ((name, struct-code), ...) and SIZE follows from them.

    Padding and reserved fields are declared as 'Nx' codes with name None; encode writes
    zeros there, decode skips them.
    """

    FIELDS: ClassVar[tuple[tuple[str | None, str], ...]] = ()
    SIZE: ClassVar[int]
    _fmt: ClassVar[struct.Struct]
    _names: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls._fmt = struct.Struct("<" + "".join(code for _, code in cls.FIELDS))
        cls._names = tuple(name for name, code in cls.FIELDS if name is not None)
        cls.SIZE = cls._fmt.size

    def __init__(self, **values: Any) -> None:
        for name in self._names:
            setattr(self, name, values.pop(name, 0 if not self._is_bytes(name) else b""))
        if values:
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(values)}")

    @classmethod
    def _is_bytes(cls, name: str) -> bool:
        for n, code in cls.FIELDS:
            if n == name:
                return code.endswith("s")
        return False

    @classmethod
    def field_layout(cls) -> dict[str, tuple[int, int]]:
        """{field name: (offset, size)} of the named fields (reserved ones left out)."""
        out = {}
        off = 0
        for name, code in cls.FIELDS:
            size = struct.calcsize("<" + code)
            if name is not None:
                out[name] = (off, size)
            off += size
        return out

    @classmethod
    def decode(cls: type[R], buf: Buffer, offset: int = 0, what: str | None = None) -> R:
        if offset < 0 or len(buf) - offset < cls.SIZE:
            raise CorruptImageError(f"{what or cls.__name__} truncated at offset {offset}")
        vals = cls._fmt.unpack_from(buf, offset)
        obj = cls.__new__(cls)
        for name, val in zip(cls._names, vals):
            setattr(obj, name, val)
        return obj

    @classmethod
    def decode_many(cls: type[R], buf: Buffer, offset: int, count: int,
                    what: str | None = None) -> list[R]:
        """`count` records back to back from `offset`: decode's result, one table unpack
        (bootstrap tables hold tens of thousands of entries)."""
        end = offset + count * cls.SIZE
        if offset < 0 or count < 0 or len(buf) < end:
            raise CorruptImageError(f"{what or cls.__name__} table truncated at offset "
                                    f"{offset}")
        names, new = cls._names, cls.__new__
        out = []
        for vals in cls._fmt.iter_unpack(memoryview(buf)[offset:end]):
            obj = new(cls)
            obj.__dict__.update(zip(names, vals))
            out.append(obj)
        return out

    @classmethod
    def iter_rows(cls, buf: Buffer, offset: int, count: int,
                  what: str | None = None) -> Iterator[tuple[Any, ...]]:
        """The field tuples (FIELDS order, reserved ones left out) of `count` records
        back to back from `offset`, without building records."""
        end = offset + count * cls.SIZE
        if offset < 0 or count < 0 or len(buf) < end:
            raise CorruptImageError(f"{what or cls.__name__} table truncated at offset "
                                    f"{offset}")
        return cls._fmt.iter_unpack(memoryview(buf)[offset:end])

    @classmethod
    def pack(cls, *values: Any) -> bytes:
        """Encode the named fields given in FIELDS order, without building a record (the
        fast path of writers that emit many records)."""
        return cls._fmt.pack(*values)

    def encode(self) -> bytes:
        return self._fmt.pack(*(getattr(self, n) for n in self._names))

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for n in self._names:
            v = getattr(self, n)
            out[n] = v.hex() if isinstance(v, bytes) else v
        return out

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._names)
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, n) == getattr(other, n) for n in self._names)

    def __getattr__(self, name: str) -> Any:
        # fields are set per instance from FIELDS; this tells type checkers so
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
