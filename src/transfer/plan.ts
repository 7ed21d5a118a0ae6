/**
 * What a copy sends: the file's data extents (holes are never sent), cut into fixed segments that
 * are verified — and on a retry skipped — one by one. Pure code, unit-testable.
 */
import { createHash, type Hash } from 'node:crypto';

export interface Extent {
  offset: number;
  length: number;
}

export interface Segment {
  index: number;
  start: number;
  end: number;
  /** data extents inside [start, end), ordered */
  extents: Extent[];
  dataBytes: number;
}

/**
 * At most this many extents are kept of one file. `qemu-img map` of a fragmented sparse disk prints
 * ~30 MB of JSON per GiB; held whole (and planned) it ends the operator with an out-of-memory, and a
 * cold move resumes at `transfer` after every restart: a crash loop. Beyond the bound, holes narrower
 * than a growing granule are taken as data — read from the source as the zeros they are — so the map
 * stays small and the copy stays exact (holes are an optimisation, never a correctness matter).
 */
export const MAX_EXTENTS = 32_768;
/** a qemu-img map JSON entry is ~120 bytes; a longer line is not one */
const MAX_MAP_LINE = 4096;

/** Data extents in ascending order, merged, bounded in count (see MAX_EXTENTS). */
export class ExtentMap {
  private readonly out: Extent[] = [];
  /** holes shorter than this many bytes are absorbed into the data around them */
  private granule = 1;

  constructor(
    private readonly size: number,
    private readonly max = MAX_EXTENTS,
  ) {}

  /** one data extent, offsets ascending */
  add(offset: number, length: number): void {
    const len = Math.min(length, this.size - offset);
    if (!(len > 0) || !Number.isSafeInteger(offset) || offset < 0) return;
    const prev = this.out[this.out.length - 1];
    if (prev && offset < prev.offset) throw new Error(`extent map out of order at ${offset}`);
    if (prev && offset - (prev.offset + prev.length) < this.granule) prev.length = Math.max(prev.offset + prev.length, offset + len) - prev.offset;
    else this.out.push({ offset, length: len });
    if (this.out.length > this.max) this.coarsen();
  }

  /** One line of `qemu-img map --output=json` (it prints one entry per line); other lines ([, ]) are ignored. */
  line(text: string): void {
    if (text.length > MAX_MAP_LINE) throw new Error(`qemu-img map printed a line of ${text.length} bytes: not an extent entry`);
    const t = text.trim().replace(/^\[/, '').replace(/[,\]]+$/, '').trim();
    if (!t.startsWith('{')) return;
    const e = JSON.parse(t) as { start?: unknown; length?: unknown; data?: unknown };
    if (typeof e.start !== 'number' || typeof e.length !== 'number') throw new Error('qemu-img map printed an entry without start and length');
    if (e.data === true) this.add(e.start, e.length);
  }

  extents(): Extent[] {
    return this.out.map((e) => ({ ...e }));
  }

  /** Widens the granule until the map holds at most half its bound. */
  private coarsen(): void {
    while (this.out.length > this.max / 2) {
      this.granule = this.granule < 4096 ? 4096 : this.granule * 4;
      let w = 0;
      for (let r = 1; r < this.out.length; r++) {
        const prev = this.out[w] as Extent;
        const cur = this.out[r] as Extent;
        if (cur.offset - (prev.offset + prev.length) < this.granule) prev.length = cur.offset + cur.length - prev.offset;
        else this.out[++w] = cur;
      }
      this.out.length = w + 1;
    }
  }
}

/** Data extents from `qemu-img map -f raw --output=json` (SEEK_DATA/SEEK_HOLE of the file itself). */
export function parseQemuImgMap(json: string, size: number, max = MAX_EXTENTS): Extent[] {
  const map = new ExtentMap(size, max);
  for (const e of JSON.parse(json) as Array<{ start: number; length: number; data: boolean }>) if (e.data) map.add(e.start, e.length);
  return map.extents();
}

/** Segments of `segmentBytes` that contain data; segments that are all hole need nothing sent. */
export function planSegments(size: number, extents: Extent[], segmentBytes: number): Segment[] {
  if (!(segmentBytes > 0)) throw new Error('segmentBytes must be positive');
  const byIndex = new Map<number, Segment>();
  for (const e of extents) {
    let off = e.offset;
    const end = Math.min(e.offset + e.length, size);
    while (off < end) {
      const index = Math.floor(off / segmentBytes);
      const segEnd = Math.min((index + 1) * segmentBytes, size);
      const len = Math.min(end, segEnd) - off;
      let s = byIndex.get(index);
      if (!s) {
        s = { index, start: index * segmentBytes, end: segEnd, extents: [], dataBytes: 0 };
        byIndex.set(index, s);
      }
      s.extents.push({ offset: off, length: len });
      s.dataBytes += len;
      off += len;
    }
  }
  return [...byIndex.values()].sort((a, b) => a.index - b.index);
}

/** The READER's op list: D lines for the extents, an E line after each segment (framed mode). */
export function opsText(segments: Segment[], withEnds: boolean): string {
  const lines: string[] = [];
  for (const s of segments) {
    for (const e of s.extents) lines.push(`D ${e.offset} ${e.length}`);
    if (withEnds) lines.push(`E ${s.index}`);
  }
  return lines.length ? `${lines.join('\n')}\n` : '';
}

/** Ranges of `data` not covered by `covered` (both sorted, non-overlapping within themselves). */
export function subtractExtents(data: Extent[], covered: Extent[]): Extent[] {
  // both ascending and non-overlapping: one pass over each (a bounded map has tens of thousands)
  const out: Extent[] = [];
  let c = 0;
  for (const d of data) {
    let pos = d.offset;
    const end = d.offset + d.length;
    while (c < covered.length && (covered[c] as Extent).offset + (covered[c] as Extent).length <= pos) c++;
    for (let k = c; k < covered.length && pos < end; k++) {
      const cv = covered[k] as Extent;
      if (cv.offset >= end) break;
      if (cv.offset > pos) out.push({ offset: pos, length: cv.offset - pos });
      pos = Math.max(pos, cv.offset + cv.length);
    }
    if (pos < end) out.push({ offset: pos, length: end - pos });
  }
  return out;
}

/**
 * Parses the framed stream in the operator: checks every frame against the plan (right extents,
 * right order, nothing missing) and computes each segment's sha256 over the file bytes it carries.
 */
export class FrameParser {
  private readonly hdr = Buffer.alloc(17);
  private hdrFill = 0;
  private remaining = 0;
  private seg: Segment | undefined;
  private extIdx = 0;
  private hash: Hash | undefined;
  private next = 0;
  dataBytes = 0;

  constructor(
    private readonly segments: Segment[],
    private readonly onSegment: (index: number, sha256: string) => void,
    private readonly onData: (bytes: number) => void = () => undefined,
  ) {}

  push(buf: Buffer): void {
    let i = 0;
    while (i < buf.length) {
      if (this.remaining > 0) {
        const take = Math.min(this.remaining, buf.length - i);
        this.hash?.update(buf.subarray(i, i + take));
        this.remaining -= take;
        this.dataBytes += take;
        i += take;
        this.onData(take);
        continue;
      }
      const take = Math.min(17 - this.hdrFill, buf.length - i);
      buf.copy(this.hdr, this.hdrFill, i, i + take);
      this.hdrFill += take;
      i += take;
      if (this.hdrFill < 17) break;
      this.hdrFill = 0;
      this.frame(String.fromCharCode(this.hdr[0] as number), Number(this.hdr.readBigUInt64BE(1)), Number(this.hdr.readBigUInt64BE(9)));
    }
  }

  private frame(type: string, a: number, b: number): void {
    if (!this.seg) {
      this.seg = this.segments[this.next];
      if (!this.seg) throw new Error(`stream has more segments than planned (${this.segments.length})`);
      this.extIdx = 0;
      this.hash = createHash('sha256');
    }
    const seg = this.seg;
    if (type === 'D') {
      const e = seg.extents[this.extIdx];
      if (!e || e.offset !== a || e.length !== b) throw new Error(`unexpected data frame ${a}+${b} in segment ${seg.index}`);
      this.extIdx++;
      this.remaining = b;
      return;
    }
    if (type === 'E') {
      if (a !== seg.index || this.extIdx !== seg.extents.length) throw new Error(`segment ${seg.index} ended early or out of order (got end of ${a})`);
      this.onSegment(seg.index, (this.hash as Hash).digest('hex'));
      this.seg = undefined;
      this.next++;
      return;
    }
    throw new Error(`bad frame type ${JSON.stringify(type)}`);
  }

  /** throws unless the stream ended on a frame boundary after every planned segment */
  finish(): void {
    if (this.remaining > 0 || this.hdrFill > 0 || this.seg || this.next !== this.segments.length) {
      throw new Error(`stream ended early: ${this.next}/${this.segments.length} segments complete`);
    }
  }
}
