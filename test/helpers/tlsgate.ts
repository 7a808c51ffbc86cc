// Starts the real tlsgate CLI as a child process, the way a user runs it, and watches its logs
// and admin port.
import { spawn } from 'node:child_process';
import http from 'node:http';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { run, stopChild, trackChild, type RunOptions, type RunResult } from './exec.js';
import { freePort, sleep } from './ports.js';

/** Repo root: this file compiles to dist/test/helpers/, three levels below it. */
export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
/** The compiled CLI entry point. */
export const CLI_MAIN = path.join(REPO_ROOT, 'dist', 'src', 'cli', 'main.js');

const MAX_LINES = 20_000;
const MAX_LINE_CHARS = 64 * 1024;

export interface StartTlsgateOptions {
  /** Each becomes one `--config <path>` (files or directories). */
  configPaths: readonly string[];
  /** Extra CLI arguments after the generated ones. */
  args?: readonly string[];
  /** Merged over process.env. */
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** How long to wait for `GET /ready` to answer 200 (default 15 s). */
  readyTimeoutMs?: number;
  /** Entry script to run instead of dist/src/cli/main.js (tests of the harness itself). */
  main?: string;
}

export interface Gateway {
  pid: number;
  adminPort: number;
  /** http://127.0.0.1:<adminPort> */
  adminUrl: string;
  /** stdout and stderr lines, in arrival order (capped at the most recent 20 000). */
  logs(): string[];
  stdoutLines(): string[];
  stderrLines(): string[];
  /** stdout lines that are JSON objects with a 'reason', 'status' or 'authority' key. */
  accessLogs(): Record<string, unknown>[];
  /** Resolves with the first line (already seen or future) that matches. */
  waitForLog(predicate: ((line: string) => boolean) | RegExp, timeoutMs?: number): Promise<string>;
  /** Same, over access-log entries. */
  waitForAccessLog(predicate: (entry: Record<string, unknown>) => boolean, timeoutMs?: number): Promise<Record<string, unknown>>;
  /** GET on the admin port. */
  admin(pathname: string): Promise<{ status: number; body: string; headers: http.IncomingHttpHeaders }>;
  /** True until the process has exited. */
  readonly running: boolean;
  /** Sends the signal (SIGKILL after 10 s) and resolves with the exit code (null if killed by a signal). */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

function isAccessLog(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value) &&
    ('reason' in value || 'status' in value || 'authority' in value);
}

/** One GET to 127.0.0.1:port, bounded by timeoutMs; never rejects on HTTP status. */
export function httpGet(
  port: number,
  pathname: string,
  timeoutMs = 5_000,
): Promise<{ status: number; body: string; headers: http.IncomingHttpHeaders }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: pathname, timeout: timeoutMs, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (c: Buffer) => {
        size += c.length;
        if (size <= 16 * 1024 * 1024) chunks.push(c);
      });
      res.on('error', reject);
      res.on('end', () =>
        resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8'), headers: res.headers }));
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${pathname} timed out`)));
    req.on('error', reject);
  });
}

export async function startTlsgate(opts: StartTlsgateOptions): Promise<Gateway> {
  // The admin port is ours to pick, so a lost race for it (another process bound it between our
  // check and the child's bind) is retried on a new port; the test's own ports are not.
  for (let attempt = 1; ; attempt++) {
    const adminPort = await freePort();
    try {
      return await startOn(opts, adminPort);
    } catch (error) {
      const lostAdminPort = error instanceof Error && error.message.includes('EADDRINUSE') &&
        error.message.includes(`127.0.0.1:${adminPort} `);
      if (!lostAdminPort || attempt >= 3) throw error;
    }
  }
}

async function startOn(opts: StartTlsgateOptions, adminPort: number): Promise<Gateway> {
  const main = opts.main ?? CLI_MAIN;
  const args = [main, 'run'];
  for (const p of opts.configPaths) args.push('--config', p);
  args.push('--admin-port', String(adminPort), '--admin-address', '127.0.0.1', ...(opts.args ?? []));
  // Test defaults unless the caller chose: listeners on loopback only, and no drain grace so
  // stop() is fast (the CLI default keeps accepting for 5 s after SIGTERM).
  if (opts.main === undefined) {
    const given = opts.args ?? [];
    if (!given.includes('--bind-address')) args.push('--bind-address', '127.0.0.1');
    if (!given.includes('--drain-grace')) args.push('--drain-grace', '0');
    // One process unless a test asks for workers: its pid is the one that serves and logs.
    if (!given.includes('--workers')) args.push('--workers', '1');
  }

  const child = spawn(process.execPath, args, {
    cwd: opts.cwd ?? REPO_ROOT,
    env: { ...process.env, ...opts.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  trackChild(child);

  const all: string[] = [];
  const out: string[] = [];
  const err: string[] = [];
  const access: Record<string, unknown>[] = [];
  const waiters = new Set<(line: string) => void>();
  const push = (list: string[], line: string): void => {
    list.push(line);
    if (list.length > MAX_LINES) list.splice(0, list.length - MAX_LINES);
  };
  const onLine = (list: string[], raw: string, fromStdout: boolean): void => {
    const line = raw.length > MAX_LINE_CHARS ? raw.slice(0, MAX_LINE_CHARS) : raw;
    push(all, line);
    push(list, line);
    if (fromStdout && line.startsWith('{')) {
      try {
        const parsed: unknown = JSON.parse(line);
        if (isAccessLog(parsed)) {
          access.push(parsed);
          if (access.length > MAX_LINES) access.splice(0, access.length - MAX_LINES);
        }
      } catch {
        // not JSON: an ordinary log line
      }
    }
    for (const w of [...waiters]) w(line);
  };
  readline.createInterface({ input: child.stdout, crlfDelay: Infinity }).on('line', (l) => onLine(out, l, true));
  readline.createInterface({ input: child.stderr, crlfDelay: Infinity }).on('line', (l) => onLine(err, l, false));

  let exitCode: number | null | undefined;
  let exitSignal: NodeJS.Signals | null = null;
  const exited = new Promise<number | null>((resolve) => {
    child.once('exit', (code, signal) => {
      exitCode = code;
      exitSignal = signal;
      resolve(code);
    });
  });
  await new Promise<void>((resolve, reject) => {
    child.once('spawn', resolve);
    child.once('error', reject);
  });

  const describeFailure = (why: string): Error =>
    new Error(`${why}\n--- tlsgate ${args.slice(1).join(' ')}\n--- stderr:\n${err.slice(-200).join('\n')}\n--- stdout:\n${out.slice(-50).join('\n')}`);

  // Poll /ready every 50 ms; bail out as soon as the process exits.
  const deadline = Date.now() + (opts.readyTimeoutMs ?? 15_000);
  let ready = false;
  while (!ready && Date.now() < deadline && exitCode === undefined) {
    try {
      const res = await httpGet(adminPort, '/ready', 1_000);
      if (res.status === 200) ready = true;
    } catch {
      // not listening yet
    }
    if (!ready) await sleep(50);
  }
  if (!ready) {
    if (exitCode !== undefined) {
      // Let readline drain what the process wrote before it died.
      await sleep(50);
      throw describeFailure(`tlsgate exited (code ${exitCode}, signal ${exitSignal}) before /ready answered 200`);
    }
    await stopChild(child, 'SIGKILL', 2_000);
    throw describeFailure(`tlsgate /ready did not answer 200 within ${opts.readyTimeoutMs ?? 15_000} ms`);
  }

  const waitFor = <T>(check: (line: string) => T | undefined, existing: () => T | undefined, timeoutMs: number, what: string): Promise<T> =>
    new Promise((resolve, reject) => {
      const found = existing();
      if (found !== undefined) {
        resolve(found);
        return;
      }
      const waiter = (line: string): void => {
        const hit = check(line);
        if (hit !== undefined) {
          finish();
          resolve(hit);
        }
      };
      const timer = setTimeout(() => {
        finish();
        reject(describeFailure(`no ${what} matched within ${timeoutMs} ms`));
      }, timeoutMs);
      const finish = (): void => {
        clearTimeout(timer);
        waiters.delete(waiter);
      };
      waiters.add(waiter);
    });

  return {
    pid: child.pid ?? -1,
    adminPort,
    adminUrl: `http://127.0.0.1:${adminPort}`,
    logs: () => [...all],
    stdoutLines: () => [...out],
    stderrLines: () => [...err],
    accessLogs: () => [...access],
    waitForLog(predicate, timeoutMs = 5_000) {
      const test = predicate instanceof RegExp ? (l: string) => predicate.test(l) : predicate;
      return waitFor((l) => (test(l) ? l : undefined), () => all.find(test), timeoutMs, 'log line');
    },
    waitForAccessLog(predicate, timeoutMs = 5_000) {
      // Access entries are parsed before waiters run, so the newest entry is the candidate.
      return waitFor(
        () => {
          const last = access.at(-1);
          return last !== undefined && predicate(last) ? last : undefined;
        },
        () => access.find(predicate),
        timeoutMs,
        'access log entry',
      );
    },
    admin: (pathname) => httpGet(adminPort, pathname),
    get running() {
      return exitCode === undefined;
    },
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (exitCode !== undefined) return exitCode;
      await stopChild(child, signal, 10_000);
      return exited;
    },
  };
}

/** Runs `node dist/src/cli/main.js <args>` (validate, explain, ca …) to completion. */
export function runCli(args: readonly string[], opts: RunOptions & { main?: string } = {}): Promise<RunResult> {
  return run(process.execPath, [opts.main ?? CLI_MAIN, ...args], {
    cwd: REPO_ROOT,
    timeoutMs: 30_000,
    ...opts,
    env: { ...process.env, ...opts.env },
  });
}
