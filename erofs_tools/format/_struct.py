"""A tiny declarative base for fixed-size little-endian records."""
import struct

from erofs_tools.errors import CorruptImageError


class Record:
    """Subclasses set FIELDS = ((name, struct-code), ...) and SIZE follows from them.

    Padding and reserved fields are declared as 'Nx' codes with name None; encode writes
    zeros there, decode skips them.
    """

    FIELDS: tuple = ()
    _fmt: struct.Struct
    _names: tuple

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls._fmt = struct.Struct("<" + "".join(code for _, code in cls.FIELDS))
        cls._names = tuple(name for name, code in cls.FIELDS if name is not None)
        cls.SIZE = cls._fmt.size

    def __init__(self, **values):
        for name in self._names:
            setattr(self, name, values.pop(name, 0 if not self._is_bytes(name) else b""))
        if values:
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(values)}")

    @classmethod
    def _is_bytes(cls, name):
        for n, code in cls.FIELDS:
            if n == name:
                return code.endswith("s")
        return False

    @classmethod
    def decode(cls, buf, offset=0, what=None):
        if offset < 0 or len(buf) - offset < cls.SIZE:
            raise CorruptImageError(f"{what or cls.__name__} truncated at offset {offset}")
        vals = cls._fmt.unpack_from(buf, offset)
        obj = cls.__new__(cls)
        for name, val in zip(cls._names, vals):
            setattr(obj, name, val)
        return obj

    def encode(self):
        return self._fmt.pack(*(getattr(self, n) for n in self._names))

    def as_dict(self):
        out = {}
        for n in self._names:
            v = getattr(self, n)
            out[n] = v.hex() if isinstance(v, bytes) else v
        return out

    def __repr__(self):
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._names)
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, n) == getattr(other, n) for n in self._names)
