// A Telemetry that keeps what the data plane reports, for tests that run it in process.
import type { AccessLogEntry, Telemetry } from '../../src/runtime/telemetry.js';
import { sleep } from './ports.js';

export class RecordingTelemetry implements Telemetry {
  entries: AccessLogEntry[] = [];
  /** When each entry was recorded (Date.now()). */
  recordedAt: number[] = [];
  counts = new Map<string, number>();
  accessLog(e: AccessLogEntry): void {
    this.entries.push(e);
    this.recordedAt.push(Date.now());
  }
  count(name: string, labels?: Record<string, string>, by = 1): void {
    // Label order as given: the key also shows that a label set is unchanged.
    const k = `${name}${JSON.stringify(labels ?? {})}`;
    this.counts.set(k, (this.counts.get(k) ?? 0) + by);
  }
  observe(): void {}
  gauge(): void {}
  log(): void {}
  countOf(name: string, labels: Record<string, string>): number {
    return this.counts.get(`${name}${JSON.stringify(labels)}`) ?? 0;
  }
  /**
   * The entry of the connection whose client side used local port `port`: the newest one recorded
   * at or after `since` (client ports get reused, and an entry may be written a little after the
   * close: the native relay hands its records over in batches).
   */
  async entryFor(port: number, timeoutMs = 5_000, since = 0): Promise<AccessLogEntry> {
    const deadline = Date.now() + timeoutMs;
    const down = `127.0.0.1:${port}`;
    for (;;) {
      for (let i = this.entries.length - 1; i >= 0; i--) {
        if (this.recordedAt[i]! < since) break;
        if (this.entries[i]!.downstream === down) return this.entries[i]!;
      }
      if (Date.now() > deadline) throw new Error(`no access-log entry for client port ${port}: ${JSON.stringify(this.entries)}`);
      await sleep(20);
    }
  }
}

/** A MESH_EXTERNAL ServiceEntry with one port and the endpoint 127.0.0.1 (YAML). */
export function localServiceEntry(name: string, host: string, port: number, protocol = 'TCP'): string {
  return `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ${name}}
spec:
  hosts: [${host}]
  location: MESH_EXTERNAL
  ports: [{number: ${port}, name: p, protocol: ${protocol}}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
`;
}
