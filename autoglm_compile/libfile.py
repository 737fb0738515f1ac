"""The library file, read without loading it: its ELF machine and exported symbols, and the modules TVM packs
inside it (the VM executable, device code), so a build for another machine can be checked here.

TVM packs a library's imported modules into one blob, exported as `__tvm_ffi__library_bin`:

    u64 nbytes | vec<u64> import_tree_row_ptr | vec<u64> import_tree_child_indices | per module: str kind [str payload]

where vec is a u64 count and the items, str is a u64 length and the bytes, and the kind "_lib" (the library's own
code) has no payload. A CUDA module's payload is str format ("cuda" source, "ptx", "cubin", "fatbin"), the
function table, and str code, last.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

BLOB_SYMBOL = "__tvm_ffi__library_bin"
# e_machine values (ELF specification / binutils' elf/common.h)
MACHINES = {3: "x86", 40: "ARM", 62: "x86-64", 183: "AArch64", 243: "RISC-V"}


class LibraryFormatError(Exception):
    """The file is not what a build writes (not ELF64, no TVM blob, a blob in an unknown layout)."""


# ------------------------------------------------------------------------------------------------------- ELF

@dataclass
class Section:
    name: str
    type: int
    addr: int
    offset: int
    size: int
    link: int
    entsize: int


@dataclass
class ElfFile:
    data: bytes
    machine: str
    sections: list[Section]

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)

    def section_bytes(self, s: Section) -> bytes:
        return self.data[s.offset:s.offset + s.size]

    def dynamic_symbols(self) -> dict[str, int]:
        """Defined symbols of the dynamic symbol table (what the library exports), by name: their addresses."""
        dynsym, dynstr = self.section(".dynsym"), self.section(".dynstr")
        if dynsym is None or dynstr is None:
            return {}
        names = self.section_bytes(dynstr)
        out = {}
        for off in range(dynsym.offset, dynsym.offset + dynsym.size, dynsym.entsize or 24):
            st_name, _info, _other, st_shndx, st_value, _size = struct.unpack_from("<IBBHQQ", self.data, off)
            if st_name and st_shndx != 0:  # 0: undefined (imported from another library)
                out[names[st_name:names.index(b"\0", st_name)].decode()] = st_value
        return out

    def read_at(self, addr: int, size: int) -> bytes:
        """`size` bytes at virtual address `addr`, from the section that holds it."""
        for s in self.sections:
            if s.addr and s.type != 8 and s.addr <= addr < s.addr + s.size:  # type 8: NOBITS (.bss)
                start = s.offset + addr - s.addr
                return self.data[start:start + size]
        raise LibraryFormatError(f"address {addr:#x} is in no section of the file")


def read_elf(path: str | Path) -> ElfFile:
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise LibraryFormatError(f"{path}: not a 64-bit little-endian ELF file")
    (e_machine,) = struct.unpack_from("<H", data, 18)
    e_shoff, = struct.unpack_from("<Q", data, 40)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 58)
    raw = []
    for i in range(e_shnum):
        name, typ, _flags, addr, offset, size, link, _info, _align, entsize = struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)
        raw.append((name, typ, addr, offset, size, link, entsize))
    strtab = raw[e_shstrndx]
    names = data[strtab[3]:strtab[3] + strtab[4]]
    sections = [Section(names[n:names.index(b"\0", n)].decode(), t, a, o, s, l, e) for n, t, a, o, s, l, e in raw]
    return ElfFile(data, MACHINES.get(e_machine, f"machine {e_machine}"), sections)


# ------------------------------------------------------------------------------------------ TVM's imports blob

@dataclass
class PackedModule:
    kind: str
    payload: bytes | None  # None for "_lib"


@dataclass
class ImportsBlob:
    header: bytes  # the two import-tree vectors, as written
    modules: list[PackedModule]

    def to_bytes(self) -> bytes:
        body = bytearray(self.header)
        for m in self.modules:
            body += pack_str(m.kind.encode())
            if m.payload is not None:
                body += pack_str(m.payload)
        return struct.pack("<Q", len(body)) + bytes(body)


def pack_str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise LibraryFormatError("TVM blob ends early")
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def vec(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]

    def str(self) -> bytes:
        n = self.u64()
        if self.pos + n > len(self.data):
            raise LibraryFormatError("TVM blob ends early")
        self.pos += n
        return self.data[self.pos - n:self.pos]


def parse_imports_blob(blob: bytes) -> ImportsBlob:
    """Parse the blob as packed (starting with its u64 length)."""
    r = _Reader(blob)
    nbytes = r.u64()
    if nbytes != len(blob) - 8:
        raise LibraryFormatError(f"TVM blob says {nbytes} bytes, holds {len(blob) - 8}")
    rows = r.vec()
    r.vec()
    header = blob[8:r.pos]
    modules = []
    for _ in range(len(rows) - 1):
        kind = r.str().decode()
        modules.append(PackedModule(kind, None if kind == "_lib" else r.str()))
    if r.pos != len(blob):
        raise LibraryFormatError("TVM blob has trailing bytes")
    return ImportsBlob(header, modules)


def split_cuda_payload(payload: bytes, code_len: int | None = None) -> tuple[str, bytes, bytes]:
    """(format, function table as written, code) of a CUDA module's payload. The code is the last item; the table
    before it is kept as bytes. Without `code_len`, the code is the first item after the format whose length
    prefix reaches exactly to the end."""
    import numpy as np

    r = _Reader(payload)
    fmt = r.str().decode()
    n = len(payload)
    if code_len is None:
        a = np.frombuffer(payload, dtype=np.uint8)[r.pos:]
        m = len(a) - 7
        prefix = sum(a[k:k + m].astype(np.uint64) << np.uint64(8 * k) for k in range(8)) if m > 0 else np.zeros(0, np.uint64)
        ends = np.arange(m, dtype=np.uint64) + np.uint64(r.pos + 8)
        hits = np.flatnonzero(prefix + ends == np.uint64(n))
        if not len(hits):
            raise LibraryFormatError("CUDA module payload in an unknown layout")
        code_len = n - (r.pos + int(hits[0]) + 8)
    tail = n - code_len - 8
    if tail < r.pos or struct.unpack_from("<Q", payload, tail)[0] != code_len:
        raise LibraryFormatError("CUDA module payload in an unknown layout")
    return fmt, payload[r.pos:tail], payload[tail + 8:]


def device_code(path: str | Path) -> list[tuple[str, str, bytes]]:
    """(module kind, format, code) of each device module packed in a built library, e.g. ("cuda", "fatbin", ...)."""
    return [(m.kind, *split_cuda_payload(m.payload)[::2]) for m in library_blob(path).modules if m.kind == "cuda"]


def library_blob(path: str | Path) -> ImportsBlob:
    """The imports blob of a built library."""
    elf = read_elf(path)
    addr = elf.dynamic_symbols().get(BLOB_SYMBOL)
    if addr is None:
        raise LibraryFormatError(f"{path}: exports no {BLOB_SYMBOL}")
    (nbytes,) = struct.unpack("<Q", elf.read_at(addr, 8))
    return parse_imports_blob(elf.read_at(addr, nbytes + 8))
