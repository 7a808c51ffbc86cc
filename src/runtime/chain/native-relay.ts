/**
 * The optional native TCP relay (native/relay.c, built by node-gyp at install into
 * build/Release/relay.node): splice(2) between two raw TCP sockets on one relay thread, so
 * passthrough and plain TCP bytes never cross into JS. When the addon is missing (not built, not
 * Linux) or the relay mode is `js`, tcp-proxy.ts uses its JS pipe relay.
 *
 * The mode is process-wide: `tlsgate run --relay auto|native|js` sets it once at start.
 */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export type RelayMode = 'auto' | 'native' | 'js';

/** What the addon reports once per relayed connection (bytes moved natively, and why it ended). */
export interface NativeRelayResult {
  /** Bytes read from the downstream socket / written to the upstream one. */
  downRead: number;
  upWritten: number;
  /** Bytes read from the upstream socket / written to the downstream one. */
  upRead: number;
  downWritten: number;
  reason: 'ok' | 'downstream_reset' | 'upstream_reset' | 'idle_timeout' | 'stopped' | 'internal_error';
}

interface Addon {
  init(onDone: (id: number, downRead: number, upWritten: number, upRead: number, downWritten: number, reason: string) => void): void;
  start(downFd: number, upFd: number, idleTimeoutMs: number, downEof: boolean, upEof: boolean): number;
  stop(id: number): void;
}

let addon: Addon | undefined;
let loadError: string | undefined;
let loaded = false;
let mode: RelayMode = 'auto';
const pending = new Map<number, (r: NativeRelayResult) => void>();

/** build/Release/relay.node from the package root (this file is dist/src/runtime/chain/ when compiled). */
function addonPath(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const candidate = path.join(dir, 'build', 'Release', 'relay.node');
    if (existsSync(candidate)) return candidate;
    if (existsSync(path.join(dir, 'package.json'))) return candidate;
    dir = path.dirname(dir);
  }
  return path.join(dir, 'build', 'Release', 'relay.node');
}

function load(): Addon | undefined {
  if (loaded) return addon;
  loaded = true;
  if (process.platform !== 'linux') {
    loadError = `splice(2) is Linux-only (platform ${process.platform})`;
    return undefined;
  }
  const file = addonPath();
  if (!existsSync(file)) {
    loadError = `${file} is not built (npm run build:native)`;
    return undefined;
  }
  try {
    const a = createRequire(import.meta.url)(file) as Addon;
    a.init((id, downRead, upWritten, upRead, downWritten, reason) => {
      const cb = pending.get(id);
      if (!cb) return;
      pending.delete(id);
      try {
        cb({ downRead, upWritten, upRead, downWritten, reason: reason as NativeRelayResult['reason'] });
      } catch {
        // The connection is already closed; nothing a report handler does may take the process down.
      }
    });
    addon = a;
  } catch (e) {
    loadError = (e as Error).message;
  }
  return addon;
}

/** True when the addon is built and loads on this platform. */
export function nativeRelayAvailable(): boolean {
  return load() !== undefined;
}

/** Why the addon is not available (undefined when it is). */
export function nativeRelayUnavailableReason(): string | undefined {
  load();
  return addon ? undefined : loadError;
}

/**
 * Sets the process-wide relay mode. `native` when the addon is unavailable throws, so the
 * caller can refuse to start. Returns the relay that will actually be used.
 */
export function setRelayMode(m: RelayMode): 'native' | 'js' {
  if (m === 'native' && !nativeRelayAvailable()) {
    throw new Error(`--relay native: the native relay is not available: ${nativeRelayUnavailableReason()}`);
  }
  mode = m;
  return relayInUse();
}

/** The relay raw TCP connections get: `native` (splice) or `js` (stream pipe). */
export function relayInUse(): 'native' | 'js' {
  return mode !== 'js' && nativeRelayAvailable() ? 'native' : 'js';
}

/** Connections currently relayed natively (not yet reported back). */
export function nativeRelayActive(): number {
  return pending.size;
}

/**
 * Hands two connected sockets' descriptors to the relay thread. The caller must have stopped
 * reading and writing them; it keeps them open until `onDone`, which runs exactly once (also
 * after `stopNativeRelay`). Throws when setup fails (out of descriptors): nothing was started.
 */
export function startNativeRelay(
  downFd: number, upFd: number, opts: { idleTimeoutMs: number; downEof: boolean; upEof: boolean },
  onDone: (r: NativeRelayResult) => void,
): number {
  const a = load();
  if (!a) throw new Error(`native relay unavailable: ${loadError}`);
  const id = a.start(downFd, upFd, Math.max(0, Math.floor(opts.idleTimeoutMs)), opts.downEof, opts.upEof);
  pending.set(id, onDone);
  return id;
}

/** Ends a natively relayed connection; its `onDone` follows with reason `stopped`. */
export function stopNativeRelay(id: number): void {
  if (pending.has(id)) addon?.stop(id);
}
