/**
 * The student's outage of one moved VM, and its parts: the headline figure of a move.
 *
 * What the student sees is not the operator's stop→start. A cold or pre-copy move stops the guest
 * and boots it again: it serves again only when its node is Ready (kubelet up, its Lease renewed),
 * many seconds after QEMU's start returned. A live move never stops the guest: it pauses it for
 * the stop-and-copy, and the guest serves again the instant the target's vCPUs resume.
 *
 * Every time here is the operator's own clock (ms): a mix with the guest's clock would add the
 * skew between them. Both ends lean towards the longer figure, never the shorter: the outage is
 * counted from the stop command (the guest may serve a moment longer while it shuts down) to the
 * moment the operator saw the node Ready (up to one poll later than it was).
 */
import type { VMStatus } from '../api/types.js';

/** How the end of an outage was seen. */
export type OutageEnd = 'NodeReady' | 'GuestResumed';

export interface Outage {
  /** from the last moment the guest served to the first it served again, as the operator saw it */
  seconds: number;
  until: OutageEnd;
  /** when it began and ended, on the operator's clock (to line it up with what the student reports) */
  startedAt: string;
  endedAt: string;
  /** cold and pre-copy: from the stop command until the source QEMU had halted the guest */
  shutdownSeconds?: number;
  /** from the halted source until the target's QEMU was launched: fencing, the copy, its verification */
  copySeconds?: number;
  /** cold and pre-copy: from the target QEMU's launch until its node was Ready */
  bootSeconds?: number;
  /** the operator's share: from the stop command until the target's QEMU runs (what older releases called "downtime") */
  stopToStartSeconds: number;
}

/** When each edge of the outage happened (the operator's clock, ms). */
export interface OutageMarks {
  mode: 'cold' | 'precopy' | 'live';
  /** the stop command (live: QEMU stopped the guest for the stop-and-copy) */
  stoppedAt: number;
  /** the source had halted the guest (the `stop` step ended) */
  haltedAt?: number;
  /** the target's QEMU was about to be launched or resumed (the `start` step began) */
  startingAt?: number;
  /** the target's QEMU runs the guest (the `start` step's QEMU answered) */
  runningAt: number;
  /** the operator saw the node Ready with a renewed Lease */
  readyAt?: number;
}

const s = (ms: number) => Math.round(ms) / 1000;

/**
 * The outage from its marks. A live move's guest was paused, not stopped: its outage ends when it
 * resumes. A stopped guest's ends at node Ready; without one (no node seen) there is no outage
 * figure to give: undefined, never the smaller stop→start in its place.
 */
export function outageOf(m: OutageMarks): Outage | undefined {
  const stopToStartSeconds = s(m.runningAt - m.stoppedAt);
  const iso = (ms: number) => new Date(ms).toISOString();
  if (m.mode === 'live') return { seconds: stopToStartSeconds, until: 'GuestResumed', startedAt: iso(m.stoppedAt), endedAt: iso(m.runningAt), stopToStartSeconds };
  if (m.readyAt === undefined) return undefined;
  const halted = m.haltedAt ?? m.stoppedAt;
  const starting = m.startingAt ?? m.runningAt;
  return {
    seconds: s(m.readyAt - m.stoppedAt),
    until: 'NodeReady',
    startedAt: iso(m.stoppedAt),
    endedAt: iso(m.readyAt),
    shutdownSeconds: s(halted - m.stoppedAt),
    copySeconds: s(starting - halted),
    bootSeconds: s(m.readyAt - starting),
    stopToStartSeconds,
  };
}

/** One line for a person: the outage first, then where it went. */
export function describeOutage(o: Outage): string {
  if (o.until === 'GuestResumed') return `outage ${o.seconds.toFixed(2)} s (guest paused for the live hand-over)`;
  return `outage ${o.seconds.toFixed(1)} s until node Ready (shutdown ${o.shutdownSeconds?.toFixed(1)} s, copy ${o.copySeconds?.toFixed(1)} s, boot ${o.bootSeconds?.toFixed(1)} s; stop→start ${o.stopToStartSeconds.toFixed(1)} s)`;
}

/** The outage as a VM's status carries it: the figure, and beside it how it was seen and its parts. */
export function outageStatus(o: Outage): Pick<VMStatus, 'outageSeconds' | 'outage'> {
  const { seconds, ...parts } = o;
  return { outageSeconds: seconds, outage: parts };
}
