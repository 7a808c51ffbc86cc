// A TCP listener on 127.0.0.1 that never accepts: a connect() to it hangs (connect-timeout tests).
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import { stopChild, trackChild } from './exec.js';

/** A listener on 127.0.0.1 that completes no further handshake: connect() to it hangs. */
export async function startBlackhole(): Promise<{ port: number; close(): Promise<void> }> {
  // The child blocks its event loop right after listening: nothing is ever accepted.
  const child: ChildProcess = spawn(process.execPath, ['-e', `
    const s = require('node:net').createServer();
    s.listen({ port: 0, host: '127.0.0.1', backlog: 1 }, () => {
      process.stdout.write(s.address().port + '\\n', () => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0));
    });`], { stdio: ['ignore', 'pipe', 'ignore'] });
  trackChild(child);
  const port = await new Promise<number>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('blackhole listener did not start')), 10_000);
    child.stdout!.once('data', (d: Buffer) => { clearTimeout(t); resolve(Number(String(d).trim())); });
  });
  // Fill the accept queue: connections complete until it is full, then a SYN goes unanswered.
  const held: net.Socket[] = [];
  let full = false;
  for (let i = 0; i < 32 && !full; i++) {
    const s = net.connect(port, '127.0.0.1');
    s.on('error', () => {});
    held.push(s);
    full = !(await new Promise<boolean>((resolve) => {
      const t = setTimeout(() => resolve(false), 300);
      s.once('connect', () => { clearTimeout(t); resolve(true); });
    }));
  }
  if (!full) throw new Error('the blackhole accept queue never filled');
  return {
    port,
    close: async () => {
      for (const s of held) s.destroy();
      await stopChild(child, 'SIGKILL', 5_000);
    },
  };
}
