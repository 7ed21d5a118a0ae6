/** A QMP peer for unit tests: greets, answers commands from a table, records them, pushes events. */
import { Duplex, PassThrough } from 'node:stream';
import { QmpClient } from '../../src/hosts/qmp.js';

export interface FakeQemu {
  qmp: QmpClient;
  /** commands received after the capabilities negotiation */
  commands: string[];
  emit(event: string): void;
  /** QEMU goes away */
  end(): void;
}

export async function fakeQemu(answers: Record<string, unknown> = {}): Promise<FakeQemu> {
  const toClient = new PassThrough();
  const fromClient = new PassThrough();
  const commands: string[] = [];
  fromClient.setEncoding('utf8');
  fromClient.on('data', (chunk: string) => {
    for (const l of chunk.split('\n').filter(Boolean)) {
      const msg = JSON.parse(l) as { id: string; execute: string };
      commands.push(msg.execute);
      toClient.write(`${JSON.stringify({ return: answers[msg.execute] ?? {}, id: msg.id })}\n`);
    }
  });
  toClient.write(`${JSON.stringify({ QMP: { version: {}, capabilities: [] } })}\n`);
  const qmp = await QmpClient.open(Duplex.from({ readable: toClient, writable: fromClient }), { timeoutMs: 2000 });
  commands.length = 0;
  return { qmp, commands, emit: (event) => toClient.write(`${JSON.stringify({ event, data: {} })}\n`), end: () => toClient.end() };
}
