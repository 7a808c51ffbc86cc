// A throwaway MariaDB server (a server-first protocol whose TLS starts after a plaintext
// greeting) for TCP-proxy integration tests. Datadir, socket and logs live in a temp dir.
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { run, stopChild, trackChild, waitForExit, type RunOptions, type RunResult } from './exec.js';
import { freePort, sleep, waitForPort } from './ports.js';

/** The account created for TCP clients (root only logs in over the unix socket). */
export const MARIADB_USER = 'tlsgate';
export const MARIADB_PASSWORD = 'tlsgate-test';

const SERVER_CANDIDATES = ['/usr/sbin/mariadbd', '/usr/sbin/mysqld', '/usr/bin/mariadbd'];

export function mariadbBinary(): string | undefined {
  return SERVER_CANDIDATES.find((p) => existsSync(p));
}

export interface StartMariadbOptions {
  /** Paths to PEM files; enables TLS on the server (clients may still choose plaintext). */
  tls?: { cert: string; key: string; ca: string };
  /** Refuse plaintext TCP clients (require_secure_transport). */
  requireSecureTransport?: boolean;
  /** Default 30 s. */
  startTimeoutMs?: number;
}

export interface ClientOptions extends RunOptions {
  /** Default: the server's own port; pass a gateway port to go through tlsgate. */
  port?: number;
  host?: string;
}

export interface Mariadb {
  pid: number;
  port: number;
  socket: string;
  datadir: string;
  /** `mariadb --no-defaults -h 127.0.0.1 -P <port> -u tlsgate -p… <args>`, e.g. ['--ssl', '-e', 'select 1']. */
  client(args: readonly string[], opts?: ClientOptions): Promise<RunResult>;
  /** Runs SQL as root over the unix socket (no TCP, no TLS). */
  rootQuery(sql: string): Promise<RunResult>;
  errorLog(): Promise<string>;
  /** SIGTERM (clean shutdown), SIGKILL after 15 s; removes the temp dir. */
  stop(): Promise<number | null>;
}

export async function startMariadb(opts: StartMariadbOptions = {}): Promise<Mariadb> {
  const bin = mariadbBinary();
  if (bin === undefined) throw new Error('mariadbd not found; run .ci/run or apt-get install mariadb-server');
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-mariadb-'));
  const datadir = path.join(dir, 'data');
  const socket = path.join(dir, 'mysqld.sock');
  const errorLogPath = path.join(dir, 'error.log');
  const runAsRoot = process.getuid?.() === 0;
  const userArgs = runAsRoot ? ['--user=root'] : [];

  const install = await run('mariadb-install-db', ['--no-defaults', `--datadir=${datadir}`,
    '--auth-root-authentication-method=normal', '--skip-test-db', ...userArgs], { timeoutMs: 60_000 });
  if (install.code !== 0) {
    await rm(dir, { recursive: true, force: true });
    throw new Error(`mariadb-install-db failed (${install.code}):\n${install.stdout}\n${install.stderr}`);
  }

  const port = await freePort();
  const args = ['--no-defaults', `--datadir=${datadir}`, `--port=${port}`, '--bind-address=127.0.0.1',
    `--socket=${socket}`, `--pid-file=${path.join(dir, 'mysqld.pid')}`, `--log-error=${errorLogPath}`,
    '--skip-name-resolve', '--skip-log-bin', '--innodb-buffer-pool-size=16M', '--max-connections=50', ...userArgs];
  if (opts.tls !== undefined) {
    args.push(`--ssl-cert=${opts.tls.cert}`, `--ssl-key=${opts.tls.key}`, `--ssl-ca=${opts.tls.ca}`);
  }
  if (opts.requireSecureTransport === true) args.push('--require-secure-transport=ON');
  const child = spawn(bin, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  trackChild(child);
  let stderr = '';
  child.stderr.on('data', (c: Buffer) => {
    if (stderr.length < 64 * 1024) stderr += c.toString('utf8');
  });
  await new Promise<void>((resolve, reject) => {
    child.once('spawn', resolve);
    child.once('error', reject);
  });

  const errorLog = (): Promise<string> => readFile(errorLogPath, 'utf8').catch(() => '');
  const rootQuery = (sql: string): Promise<RunResult> =>
    run('mariadb', ['--no-defaults', `--socket=${socket}`, '-uroot', '-e', sql], { timeoutMs: 20_000 });

  const exited = waitForExit(child).then((code) => ({ code }));
  try {
    const ready = waitForPort(port, opts.startTimeoutMs ?? 30_000);
    const first = await Promise.race([ready.then(() => 'ready' as const), exited]);
    if (first !== 'ready') throw new Error(`mariadbd exited with ${first.code} before listening`);
    // The port opens a moment before the grant tables are usable; retry a few times.
    let created: RunResult | undefined;
    for (let attempt = 0; attempt < 40; attempt++) {
      created = await rootQuery(
        `CREATE USER IF NOT EXISTS '${MARIADB_USER}'@'%' IDENTIFIED BY '${MARIADB_PASSWORD}'; ` +
        `GRANT ALL ON *.* TO '${MARIADB_USER}'@'%'; FLUSH PRIVILEGES;`,
      );
      if (created.code === 0) break;
      await sleep(100);
    }
    if (created?.code !== 0) throw new Error(`cannot create test user: ${created?.stderr ?? ''}`);
  } catch (e) {
    await stopChild(child, 'SIGKILL', 2_000);
    const log = await errorLog();
    await rm(dir, { recursive: true, force: true });
    throw new Error(`${(e as Error).message}\n${stderr}\n${log}`);
  }

  return {
    pid: child.pid ?? -1,
    port,
    socket,
    datadir,
    client: (clientArgs, copts = {}) =>
      run('mariadb', ['--no-defaults', '-h', copts.host ?? '127.0.0.1', '-P', String(copts.port ?? port),
        '-u', MARIADB_USER, `-p${MARIADB_PASSWORD}`, '--connect-timeout=10', ...clientArgs],
      { timeoutMs: 30_000, ...copts }),
    rootQuery,
    errorLog,
    async stop() {
      const code = await stopChild(child, 'SIGTERM', 15_000);
      await rm(dir, { recursive: true, force: true });
      return code;
    },
  };
}
