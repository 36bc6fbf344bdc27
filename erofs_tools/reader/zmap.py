"""The map of a compressed inode: which decoded bytes come from which physical cluster.

EROFS splits a compressed file into logical clusters (lclusters, 2^lclusterbits bytes
each) and describes each one by an index entry: a HEAD (HEAD1/HEAD2: the start of an
extent compressed with the first/second algorithm of the inode, PLAIN: stored as is)
at `clusterofs` inside the lcluster, with the block address of its physical cluster
(pcluster), or a NONHEAD (the extent goes on; `delta[0]` is the distance back to its
head). Extents run from one head to the next. The entries are stored either full (8
bytes each) or compact (packs of 2 entries in 8 bytes or 16 in 32, sharing one base
block address). Big pclusters carry their block count (CBLKCNT) in the first NONHEAD
after the head. Three special tails: ztailpacking (the last pcluster inline right after
the indexes), fragments (the last extent, or the whole file, inside the packed inode at
a byte offset) and dedupe (pclusters shared by several extents; an extent that uses only
the start of its pcluster's decoded data is marked PARTIAL_REF).

The 48-bit layout (mkfs.erofs 1.9) may instead list a COMPRESSED_FULL inode's extents as
records (ADVISE_EXTENTS): 16 or 32 bytes each with its file offset, pcluster offset and
length (any byte offset and length: unaligned compression), their count in the map
header; or, when every extent but the last takes 2^lclusterbits bytes of input, one
record per lcluster, 8 bytes (pcluster length and 32-bit offset) or 4 (the length
only, the pclusters back to back from a le64 offset before the records). Each record's
plen carries the format (plain or the algorithm) and the partial-reference bit; the last
one, with a fragment, the fragment's offset. A record whose length is 0 stores nothing:
a HOLE, read as zeros (Linux leaves it unmapped).

An inode inside the metabox (metadata compression, reader/metabox.py) has its map
header, lcluster indexes or extent records and inline pcluster there (`ZMap.sp`,
`ZExtent.in_meta`); its other pclusters are in the image.

This module only maps; reader/zdata.py decodes. Every field is untrusted: each index
entry is bounds-checked against the image, the lookback chain of every NONHEAD must
reach the head before it (the kernel follows that chain to find what to decode), and
the number of entries read is bounded by the bytes that hold them (as is the number of
extent records).
"""
from __future__ import annotations

from typing import NamedTuple

from erofs_tools.format import erofs as E
from erofs_tools.fsutil import round_up

# decode kinds of an extent
PCLUSTER, INLINE, FRAGMENT, HOLE = range(4)
# pseudo algorithms of PLAIN extents
ALG_SHIFTED = -1               # stored as is from the pcluster start
ALG_INTERLACED = -2            # rotated by the extent's offset in its block
ALG_HOLE = -4                  # HOLE: nothing stored, reads as zeros
ALG_NAMES = {0: "lz4", 1: "lzma", 2: "deflate", 3: "zstd", ALG_SHIFTED: "plain",
             ALG_INTERLACED: "plain", ALG_HOLE: "hole"}
MAX_LCLUSTER_BITS = 20
NUM_ALGS = 4


class ZConfig(NamedTuple):
    """Image-wide compression settings (superblock + its per-algorithm records)."""
    algs: int                  # bitmask of the algorithms the image may use
    zero_padding: bool         # compressed bytes right-aligned in their pcluster
    lzma_dict_size: int
    big_pcluster: bool


class ZExtent(NamedTuple):
    la: int                    # file offset of the extent
    llen: int                  # decoded bytes
    kind: int                  # PCLUSTER, INLINE, FRAGMENT or HOLE (extent records)
    pa: int                    # image byte offset (PCLUSTER, INLINE) or packed-inode offset
    plen: int                  # bytes of the pcluster (0 for FRAGMENT)
    alg: int                   # 0..3, ALG_SHIFTED or ALG_INTERLACED (FRAGMENT: -3)
    partial: bool              # the pcluster decodes to more than llen (dedupe)
    in_meta: bool = False      # INLINE: `pa` counts in the metabox, not the image


def parse_config(img) -> ZConfig:
    """The compression configuration from the superblock and, with COMPR_CFGS, the
    per-algorithm records after it (each 4-byte aligned: le16 length + payload)."""
    sb = img.sb
    inc = sb.feature_incompat
    zero_padding = bool(inc & E.FEATURE_INCOMPAT_ZERO_PADDING)
    lzma_dict = E.LZMA_MAX_DICT_SIZE
    if not inc & E.FEATURE_INCOMPAT_COMPR_CFGS:
        return ZConfig(1 << E.COMPRESSION_LZ4, zero_padding, lzma_dict, False)
    algs = sb.u1
    if algs & ~((1 << NUM_ALGS) - 1):
        raise img._err(f"unknown compression algorithms {algs:#x}")
    off = E.SUPER_OFFSET + img.sb_size
    for alg in range(NUM_ALGS):
        if not algs & (1 << alg):
            continue
        off = round_up(off, 4)
        n = int.from_bytes(img.read(off, 2, "compression config"), "little")
        if n == 0 or n > 256:
            raise img._err(f"compression config of {ALG_NAMES[alg]}: bad length {n}")
        rec = img.read(off + 2, n, "compression config")
        off += 2 + n
        if alg == E.COMPRESSION_LZMA:
            if n < E.LzmaCfgs.SIZE:
                raise img._err(f"lzma config of {n} bytes is too short")
            c = E.LzmaCfgs.decode(rec, 0)
            if c.dict_size > E.LZMA_MAX_DICT_SIZE or c.format:
                raise img._err(f"lzma config: dict size {c.dict_size}, format {c.format} "
                               "not supported")
            lzma_dict = c.dict_size or E.LZMA_MAX_DICT_SIZE
        elif alg == E.COMPRESSION_LZ4 and n < E.Lz4Cfgs.SIZE:
            raise img._err(f"lz4 config of {n} bytes is too short")
    return ZConfig(algs, zero_padding, lzma_dict, True)


class _Entry(NamedTuple):
    type: int
    clusterofs: int
    delta0: int
    pblk: int
    cblk: int                  # CBLKCNT of a NONHEAD, else 0
    partial: bool
    nextpackoff: int


class ZMap:
    """The extents of one compressed inode (`extents`), built once by a sequential walk
    over its lcluster indexes."""

    def __init__(self, img, ino, zstate=None) -> None:
        self.img = img
        self.ino = ino
        self.sp = img.space_of(ino)       # where its header and indexes are (image or metabox)
        self.size = ino.size
        self.what = f"inode {ino.nid}"
        self.fragment_off = None       # packed-inode offset of the tail extent
        self._pack: tuple[int, list[tuple[int, int]], int] | None = None
        self.extents: list[ZExtent] = []
        if ino.layout not in (E.LAYOUT_COMPRESSED_FULL, E.LAYOUT_COMPRESSED_COMPACT):
            raise self._err(f"data layout {ino.layout_name} is not compressed")
        if self.size == 0:
            return
        cfg = img.zconfig
        self.hpos = round_up(ino.data_end, 8)
        h = self.sp.read(self.hpos, E.MapHeader.SIZE, f"{self.what} map header")
        if h[7] >> E.FRAGMENT_INODE_BIT:
            # the whole file is one fragment; the other 63 bits are its offset
            off = int.from_bytes(h, "little") ^ (1 << 63)
            self.extents = [ZExtent(0, self.size, FRAGMENT, off, 0, -3, False)]
            return
        hdr = E.MapHeader.decode(h, 0)
        self.advise = adv = hdr.h_advise
        self.full = ino.layout == E.LAYOUT_COMPRESSED_FULL
        if self.full and adv & E.ADVISE_EXTENTS:
            self._build_records(h, hdr, zstate)
            return
        self.lbits = img.blkszbits + (hdr.h_clusterbits & 15)
        if self.lbits > MAX_LCLUSTER_BITS or (not self.full and self.lbits > 14):
            raise self._err(f"logical cluster bits {self.lbits} out of range")
        self.algs = (hdr.h_algorithmtype & 15, hdr.h_algorithmtype >> 4)
        for i, a in enumerate(self.algs):
            if a >= NUM_ALGS:
                raise self._err(f"unknown HEAD{i + 1} algorithm {a}")
        self.big1 = bool(adv & E.ADVISE_BIG_PCLUSTER_1)
        self.big2 = bool(adv & E.ADVISE_BIG_PCLUSTER_2)
        if (self.big1 or self.big2) and not cfg.big_pcluster:
            raise self._err("big pclusters without the superblock feature")
        if not self.full and self.big1 != self.big2:
            raise self._err("compact indexes with big pclusters for one head type only")
        self.fragment = bool(adv & E.ADVISE_FRAGMENT_PCLUSTER)
        self.idata_size = 0
        if self.fragment:
            self.fragment_off = int.from_bytes(h[0:4], "little")
        elif adv & E.ADVISE_INLINE_PCLUSTER:
            self.idata_size = hdr.h_idata_size
        if self.full:
            self.ibase = self.hpos + E.MapHeader.SIZE + E.FULL_INDEX_PADDING
        else:
            self._compact_layout()
        self.nlc = (self.size + (1 << self.lbits) - 1) >> self.lbits
        self._check_fits()
        if zstate is not None:
            zstate.charge(ino.nid, self.nlc)
        self._build()

    def _err(self, msg):
        return self.img._err(f"{self.what}: {msg}")

    # -- index entries ------------------------------------------------------------------
    def _compact_layout(self):
        self.ibase = ebase = self.hpos + E.MapHeader.SIZE
        bs = self.img.blksz
        self.totalidx = (self.size + bs - 1) // bs
        self.c4_initial = ((32 - ebase % 32) // 4) & 7
        self.c2b = 0
        if self.advise & E.ADVISE_COMPACTED_2B and self.c4_initial < self.totalidx:
            if self.lbits > 12:
                raise self._err(f"2-byte compact indexes with cluster bits {self.lbits}")
            self.c2b = (self.totalidx - self.c4_initial) // 16 * 16

    def _check_fits(self):
        """The index entries of every lcluster must lie inside the image."""
        if self.full:
            end = self.ibase + 8 * self.nlc
        else:
            n = self.totalidx
            if n > self.img.size:
                raise self._err(f"{n} lcluster indexes do not fit in the image")
            rest = max(0, n - self.c4_initial - self.c2b)
            end = self.ibase + 4 * min(n, self.c4_initial) + 2 * self.c2b + 8 * ((rest + 1) // 2)
        if end > self.sp.size:
            raise self._err(f"lcluster indexes ({self.nlc} for size {self.size}) run past "
                            "the image end")

    def entry(self, lcn) -> _Entry:
        return self._full(lcn) if self.full else self._compact(lcn)

    def _full(self, lcn):
        pos = self.ibase + 8 * lcn
        if pos + 8 > self.sp.size:
            raise self._err(f"lcluster index {lcn} outside the image")
        sp = self.sp
        d, p = (sp.data, pos) if sp is self.img else (sp.read(pos, 8, "lcluster index"), 0)
        adv = int.from_bytes(d[p:p + 2], "little")
        t = adv & E.LI_TYPE_MASK
        if t == E.LCLUSTER_TYPE_NONHEAD:
            d0 = int.from_bytes(d[p + 4:p + 6], "little")
            cblk = 0
            if d0 & E.LI_D0_CBLKCNT:
                if not (self.big1 or self.big2):
                    raise self._err(f"CBLKCNT at lcluster {lcn} without big pclusters")
                cblk = d0 & ~E.LI_D0_CBLKCNT
                d0 = 1
            return _Entry(t, 1 << self.lbits, d0, 0, cblk, False, pos + 8)
        ofs = int.from_bytes(d[p + 2:p + 4], "little")
        if ofs >= 1 << self.lbits:
            raise self._err(f"clusterofs {ofs} of lcluster {lcn} out of range")
        pblk = int.from_bytes(d[p + 4:p + 8], "little")
        if self.img._flags[self.img._slot]:     # read after the image file shrank
            raise self.img._torn()
        return _Entry(t, ofs, 0, pblk, 0, bool(adv & E.LI_PARTIAL_REF), pos + 8)

    def _compact(self, lcn):
        if lcn >= self.totalidx:
            raise self._err(f"lcluster {lcn} beyond the compact index")
        pos = self.ibase
        shift = 2
        rel = lcn
        if rel >= self.c4_initial:
            pos += self.c4_initial * 4
            rel -= self.c4_initial
            if rel < self.c2b:
                shift = 1
            else:
                pos += self.c2b * 2
                rel -= self.c2b
        pos += rel << shift
        vcnt = 2 if shift == 2 else 16
        packsz = vcnt << shift
        base = pos - pos % packsz      # packs are aligned to their size in the image
        if base + packsz > self.sp.size:
            raise self._err(f"compact index pack of lcluster {lcn} outside the image")
        i = (pos - base) >> shift
        if self._pack is not None and self._pack[0] == base:
            _b, words, baseblk = self._pack
        else:
            # a pack is decoded once: a sequential walk reads each of its entries
            pack = self.sp.read(base, packsz, "compact index pack") + b"\0\0\0"
            lbits = max(self.lbits, 12)       # CBLKCNT (bit 11) needs 12 low bits
            encbits = ((packsz - 4) * 8) // vcnt
            words = []
            for j in range(vcnt):
                p = encbits * j
                v = int.from_bytes(pack[p // 8:p // 8 + 4], "little") >> (p & 7)
                words.append((v & ((1 << lbits) - 1), (v >> lbits) & 3))
            baseblk = int.from_bytes(pack[packsz - 4:packsz], "little")
            self._pack = (base, words, baseblk)
        dec = words.__getitem__

        big = self.big1
        nextpack = base + packsz
        lo, t = dec(i)
        if t == E.LCLUSTER_TYPE_NONHEAD:
            if lo & E.LI_D0_CBLKCNT:
                if not big:
                    raise self._err(f"CBLKCNT at lcluster {lcn} without big pclusters")
                return _Entry(t, 1 << self.lbits, 1, 0, lo & ~E.LI_D0_CBLKCNT, False, nextpack)
            if i + 1 != vcnt:
                return _Entry(t, 1 << self.lbits, lo, 0, 0, False, nextpack)
            # the last entry of a pack holds delta[1]: delta[0] comes from the one before
            plo, pt = dec(i - 1)
            if pt != E.LCLUSTER_TYPE_NONHEAD:
                plo = 0
            elif plo & E.LI_D0_CBLKCNT:
                plo = 1
            return _Entry(t, 1 << self.lbits, plo + 1, 0, 0, False, nextpack)
        if lo >= 1 << self.lbits:
            raise self._err(f"clusterofs {lo} of lcluster {lcn} out of range")
        # the head's block: the pack's base address plus the blocks of the heads before
        nblk = 0 if big else 1
        j = i
        while j > 0:
            j -= 1
            plo, pt = dec(j)
            if pt == E.LCLUSTER_TYPE_NONHEAD:
                if not big:
                    j -= plo
                    if j >= 0:
                        nblk += 1
                    continue
                if plo & E.LI_D0_CBLKCNT:
                    j -= 1
                    nblk += plo & ~E.LI_D0_CBLKCNT
                    continue
                if plo <= 1:
                    raise self._err(f"lookback distance {plo} in the pack of lcluster {lcn}")
                j -= plo - 2
                continue
            nblk += 1
        pblk = (baseblk + nblk) & 0xFFFFFFFF
        return _Entry(t, lo, 0, pblk, 0, False, nextpack)

    # -- extents ------------------------------------------------------------------------
    def _build(self):
        lbits = self.lbits
        heads = []                 # (lcn, entry, la) with la < size
        cur = -1                   # lcn of the head whose extent is open
        for lcn in range(self.nlc):
            e = self.entry(lcn)
            if e.type == E.LCLUSTER_TYPE_NONHEAD:
                # the kernel finds the head by following delta[0] back: every lcluster
                # between the open head and this one is a NONHEAD already checked to
                # lead to it, so landing anywhere in [cur, lcn) reaches the right head
                if cur < 0:
                    raise self._err(f"lcluster {lcn}: no head before it")
                if not cur <= lcn - e.delta0 < lcn:
                    raise self._err(f"lcluster {lcn}: lookback distance {e.delta0} misses "
                                    "its head")
                continue
            la = (lcn << lbits) | e.clusterofs
            if lcn == 0 and e.clusterofs:
                raise self._err(f"first extent starts at {e.clusterofs}, not 0")
            if la >= self.size:
                break              # past EOF: what is before it ends at EOF
            heads.append((lcn, e, la))
            cur = lcn
        tail_lcn = heads[-1][0]
        idataoff = None
        if self.idata_size:
            idataoff = self.entry((self.size - 1) >> lbits).nextpackoff
        bs = self.img.blksz
        cfg = self.img.zconfig
        out = []
        for k, (lcn, e, la) in enumerate(heads):
            end = heads[k + 1][2] if k + 1 < len(heads) else self.size
            llen = end - la
            if lcn == tail_lcn and self.fragment:
                off = self.fragment_off
                if self.full:
                    off |= e.pblk << 32
                out.append(ZExtent(la, llen, FRAGMENT, off, 0, -3, False))
                continue
            if e.type == E.LCLUSTER_TYPE_PLAIN:
                alg = ALG_INTERLACED if self.advise & E.ADVISE_INTERLACED_PCLUSTER else ALG_SHIFTED
            else:
                alg = self.algs[0 if e.type == E.LCLUSTER_TYPE_HEAD1 else 1]
                if not cfg.algs & (1 << alg):
                    raise self._err(f"extent at {la} uses {ALG_NAMES[alg]}, which the "
                                    "superblock does not declare")
            inline = lcn == tail_lcn and idataoff is not None
            if inline:
                kind, pa, plen = INLINE, idataoff, self.idata_size
                if pa % bs + plen > bs:
                    raise self._err(f"inline pcluster of {plen} bytes crosses a block")
            else:
                kind, pa, plen = PCLUSTER, e.pblk * bs, self._cblocks(lcn, e) * bs
            if pa + plen > (self.sp.size if inline else self.img.size):
                raise self._err(f"pcluster [{pa}, {pa + plen}) of the extent at {la} is "
                                "outside the image")
            if plen > E.PCLUSTER_MAX_SIZE or llen > E.PCLUSTER_MAX_DSIZE:
                raise self._err(f"extent at {la}: {plen} -> {llen} bytes is too large")
            if alg < 0 and llen > plen:
                raise self._err(f"plain extent at {la}: {llen} bytes in a {plen}-byte pcluster")
            if alg == ALG_INTERLACED and plen > bs:
                raise self._err(f"interlaced plain extent at {la} over {plen} bytes")
            out.append(ZExtent(la, llen, kind, pa, plen, alg, e.partial,
                               inline and self.sp is not self.img))
        self.extents = out

    def _cblocks(self, lcn, e):
        """Blocks of the pcluster of the head at `lcn` (the kernel's rule)."""
        t = e.type
        if (t == E.LCLUSTER_TYPE_HEAD1 and not self.big1) or \
                (t != E.LCLUSTER_TYPE_HEAD1 and not self.big2) or \
                (lcn + 1) << self.lbits >= self.size:
            return 1
        n = self.entry(lcn + 1)
        if n.type != E.LCLUSTER_TYPE_NONHEAD:
            return 1
        if n.delta0 != 1 or not n.cblk:
            raise self._err(f"no block count (CBLKCNT) after the head at lcluster {lcn}")
        return n.cblk

    # -- extent records (the 48-bit layout) ---------------------------------------------
    def _build_records(self, h, hdr, zstate):
        """The extents from the records of an ADVISE_EXTENTS inode, checked as the
        lcluster indexes are: in the image (or the metabox: self.sp), in file order, each
        pcluster in bounds."""
        img, sp = self.img, self.sp
        adv = self.advise
        recsz = E.extent_recsize(adv)
        pos = round_up(self.hpos + E.MapHeader.SIZE, recsz)
        self.fragment = bool(adv & E.ADVISE_FRAGMENT_PCLUSTER)
        size = self.size
        if recsz <= 8:
            self.lbits = lbits = img.blkszbits + (hdr.h_clusterbits & 15)
            n = (size + (1 << lbits) - 1) >> lbits
            starts = [i << lbits for i in range(n)] if n <= sp.size else []
        else:
            n = int.from_bytes(h[0:4], "little") | int.from_bytes(h[6:8], "little") << 32
            if n == 0:
                raise self._err("no extent records")
            starts = []
        base = pos + (8 if recsz == 4 else 0)
        if n > sp.size or base + n * recsz > sp.size:
            where = "image" if sp is img else "metabox"
            raise self._err(f"{n} extent records of {recsz} bytes run past the {where} end")
        if zstate is not None:
            zstate.charge(self.ino.nid, n)
        raw = sp.read(pos, base - pos + n * recsz, f"{self.what} extent records")
        pa = int.from_bytes(raw[0:8], "little") if recsz == 4 else 0
        recs = []
        for i in range(n):
            r = raw[base - pos + i * recsz:base - pos + (i + 1) * recsz] + bytes(32 - recsz)
            x = E.Extent.decode(r, 0)
            if recsz == 4:
                rpa = pa
                pa += x.plen & E.EXTENT_PLEN_MASK
            elif recsz == 8:
                rpa = x.pstart_lo
            else:
                rpa = x.pstart_lo | x.pstart_hi << 32
                la = x.lstart_lo | (x.lstart_hi << 32 if recsz == 32 else 0)
                if (la != 0 if i == 0 else la <= starts[-1]) or la >= size:
                    raise self._err(f"extent record {i}: file offset {la} out of order "
                                    f"(size {size})")
                starts.append(la)
            recs.append((x.plen, rpa))
        cfg = img.zconfig
        bs = img.blksz
        out = []
        for i, (plen, rpa) in enumerate(recs):
            la = starts[i]
            llen = (starts[i + 1] if i + 1 < n else size) - la
            if i + 1 == n and self.fragment:
                off = plen | (rpa << 32 if recsz > 4 else 0)
                self.fragment_off = off
                out.append(ZExtent(la, llen, FRAGMENT, off, 0, -3, False))
                continue
            fmt = plen >> E.EXTENT_PLEN_FMT_BIT
            partial = bool(plen & E.EXTENT_PLEN_PARTIAL)
            plen &= E.EXTENT_PLEN_MASK
            if not plen:
                # no stored bytes (whatever the format and partial bits say): unmapped,
                # read as zeros, as Linux 6.18 maps it (z_erofs_map_blocks_ext)
                out.append(ZExtent(la, llen, HOLE, 0, 0, ALG_HOLE, False))
                continue
            if fmt:
                alg = fmt - 1
                if alg >= NUM_ALGS or not cfg.algs & (1 << alg):
                    raise self._err(f"extent record {i}: format {fmt} is no algorithm the "
                                    "superblock declares")
            elif adv & E.ADVISE_INTERLACED_PCLUSTER and not (rpa | plen) % bs:
                alg = ALG_INTERLACED
            else:
                alg = ALG_SHIFTED
            if rpa + plen > img.size:
                raise self._err(f"extent record {i}: pcluster [{rpa}, {rpa + plen}) is "
                                "outside the image")
            if plen > E.PCLUSTER_MAX_SIZE or llen > E.PCLUSTER_MAX_DSIZE:
                raise self._err(f"extent record {i}: {plen} -> {llen} bytes is too large")
            if alg < 0 and (llen > plen or partial):
                raise self._err(f"extent record {i}: plain extent of {llen} bytes in a "
                                f"{plen}-byte pcluster")
            if alg == ALG_INTERLACED and plen > bs:
                raise self._err(f"extent record {i}: interlaced plain extent over {plen} "
                                "bytes")
            out.append(ZExtent(la, llen, PCLUSTER, rpa, plen, alg, partial))
        self.extents = out
