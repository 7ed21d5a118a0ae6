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

/** Data extents from `qemu-img map -f raw --output=json` (SEEK_DATA/SEEK_HOLE of the file itself). */
export function parseQemuImgMap(json: string, size: number): Extent[] {
  const entries = JSON.parse(json) as Array<{ start: number; length: number; data: boolean }>;
  const out: Extent[] = [];
  for (const e of entries) {
    if (!e.data || e.length <= 0) continue;
    const offset = e.start;
    const length = Math.min(e.length, size - offset);
    if (length <= 0) continue;
    const prev = out[out.length - 1];
    if (prev && prev.offset + prev.length === offset) prev.length += length;
    else out.push({ offset, length });
  }
  return out;
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
  const out: Extent[] = [];
  for (const d of data) {
    let pos = d.offset;
    const end = d.offset + d.length;
    for (const c of covered) {
      const cEnd = c.offset + c.length;
      if (cEnd <= pos || c.offset >= end) continue;
      if (c.offset > pos) out.push({ offset: pos, length: c.offset - pos });
      pos = Math.max(pos, cEnd);
      if (pos >= end) break;
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
