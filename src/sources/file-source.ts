/**
 * Watches config paths (files and directories) and calls back when their content changes.
 *
 * A check compares a hash of every file's content (symlinks followed); identical content never
 * fires the callback. fs.watch events only trigger a check: they do not say what changed, and
 * editors' rename-and-replace writes and the Kubernetes `..data` symlink swap replace the inodes
 * being watched. A periodic poll runs the same check as a backstop.
 *
 * The poll is what an idle tlsgate spends, and each wake of the main thread is most of its cost.
 * A poll stats each file and directory once, through the callback API (no promise per call), and
 * reads a file or lists a directory only when its identity changed (DigestCache). It runs every
 * `watchedPollMs` while a watch is up, on a local filesystem, on every directory that holds a
 * config or extra file, the link to one, or the file a link points to; otherwise (a watch could
 * not be set up or failed, a path is missing, a filesystem may change without an event) every
 * `pollMs`.
 */
import { createHash } from 'node:crypto';
import { promises as fsp, readdir, realpath, stat, statfs, watch, type BigIntStats, type Dirent, type FSWatcher, type StatsFs } from 'node:fs';
import * as path from 'node:path';

export interface FileSourceOptions {
  /** Backstop poll interval while not everything is watched (see watchedPollMs). Default 500 ms. */
  pollMs?: number;
  /**
   * Backstop poll interval while every directory that matters is watched on a local filesystem.
   * Default 5 s: a change is normally seen by a watch at once, and the poll only catches what no
   * watch saw (a symlink re-pointed in a third directory, an inotify queue overflow).
   */
  watchedPollMs?: number;
  /** Quiet period after an event before checking (editors write in several steps). */
  debounceMs?: number;
  /** How long content must stay unchanged before it counts. */
  settleMs?: number;
  /** fs.watch (persistent: false); replaceable in tests. */
  watch?: (dir: string, listener: (event: string, name: string | null) => void) => FSWatcher;
}

type Failed = NodeJS.ErrnoException;
type StatResult = BigIntStats | Failed;

/**
 * How many of a check's fs calls wait on libuv's thread pool at once. The pool has four threads
 * by default and also serves DNS lookups: a hung network filesystem holds at most this many.
 */
const FS_CONCURRENCY = 2;

/**
 * Runs a callback-style fs call on each item, FS_CONCURRENCY at a time: one promise for the batch
 * instead of a promise and a microtask per call. Errors come back in place.
 */
function batch<T>(items: readonly string[], op: (item: string, cb: (err: Failed | null, value: T) => void) => void): Promise<(T | Failed)[]> {
  const out = new Array<T | Failed>(items.length);
  if (items.length === 0) return Promise.resolve(out);
  return new Promise((resolve) => {
    let next = 0;
    let done = 0;
    const one = (): void => {
      const i = next++;
      op(items[i]!, (err, value) => {
        out[i] = err ?? value;
        if (++done === items.length) resolve(out);
        else if (next < items.length) one();
      });
    };
    for (let k = 0; k < Math.min(FS_CONCURRENCY, items.length); k++) one();
  });
}

/** fs.stat of each path: symlinks followed, times in ns. */
const statAll = (paths: readonly string[]): Promise<StatResult[]> => batch<BigIntStats>(paths, (p, cb) => stat(p, { bigint: true }, cb));

const errorCode = (e: unknown): string => `<${(e as { code?: string }).code ?? 'error'}>`;

/** Identity of a file or directory: device, inode, size, mtime and ctime in ns. */
const stampOf = (st: BigIntStats): string => `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`;

/** The later of mtime and ctime, in ms. */
const changedMsOf = (st: BigIntStats): number => Number(st.ctimeNs > st.mtimeNs ? st.ctimeNs : st.mtimeNs) / 1e6;

const CONFIG_NAME = /\.(ya?ml|json)$/i;

/** SHA-256 of one file's content, or `<ENOENT>` (the error code) when it cannot be read. */
export async function fileDigest(file: string): Promise<string> {
  try {
    return createHash('sha256').update(await fsp.readFile(file)).digest('hex');
  } catch (e) {
    return errorCode(e);
  }
}

/** A file or directory whose times are this recent is read (listed) even when its identity looks unchanged. */
const RECENT_MS = 2_000;

/** A directory's visible entries, sorted; `plain` when the entry is a regular file (not a symlink). */
type Entries = { name: string; plain: boolean }[];

function listDir(dir: string): Promise<Entries | undefined> {
  return new Promise((resolve) => readdir(dir, { withFileTypes: true }, (err, ents: Dirent[]) => {
    if (err) return resolve(undefined);
    resolve(ents
      .filter((e) => !e.name.startsWith('.')) // ..data, ..2024_..., .git
      .map((e) => ({ name: e.name, plain: e.isFile() }))
      .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)));
  }));
}

/**
 * Digests remembered by file identity (inode, size, mtime and ctime in ns, symlinks followed), so a
 * poll of unchanged files costs a stat each instead of a read and a SHA-256. Any write changes
 * mtime/ctime, and a `..data` symlink swap or rename-over changes the inode.
 *
 * Directory listings are remembered the same way: adding, removing or renaming an entry changes
 * the directory's mtime and ctime, so an unchanged directory is not read again.
 */
export class DigestCache {
  readonly #byFile = new Map<string, { stamp: string; digest: string }>();
  readonly #dirs = new Map<string, { stamp: string; entries: Entries }>();

  async digest(file: string): Promise<string> {
    const [st] = await statAll([file]);
    return this.digestStat(file, st!, Date.now());
  }

  /** The digest of a file from its stat taken just now: a string, without reading, when its identity is unchanged. */
  digestStat(file: string, st: StatResult, now: number): string | Promise<string> {
    if (st instanceof Error) {
      this.#byFile.delete(file);
      return errorCode(st);
    }
    const stamp = stampOf(st);
    const hit = this.#byFile.get(file);
    // File times tick with the kernel's coarse clock (milliseconds), so two same-size writes in
    // one tick look alike: a file changed in the last seconds is always read.
    if (hit && hit.stamp === stamp && now - changedMsOf(st) > RECENT_MS) return hit.digest;
    return fileDigest(file).then((digest) => {
      this.#byFile.set(file, { stamp, digest });
      return digest;
    });
  }

  /** A directory's entries from its stat taken just now, listed again unless its identity is unchanged (and not recent). */
  async entries(dir: string, st: BigIntStats, now: number): Promise<Entries> {
    const stamp = stampOf(st);
    const hit = this.#dirs.get(dir);
    if (hit && hit.stamp === stamp && now - changedMsOf(st) > RECENT_MS) return hit.entries;
    const entries = await listDir(dir);
    if (entries) this.#dirs.set(dir, { stamp, entries });
    else this.#dirs.delete(dir);
    return entries ?? [];
  }

  /** Forget the directory listings (the next check lists every directory again). */
  clearListings(): void {
    this.#dirs.clear();
  }

  /** Forget everything (the next digest of each file reads it again). */
  clear(): void {
    this.#byFile.clear();
    this.#dirs.clear();
  }
}

/** What a check saw: the config files in walk order, the directories listed, the extra files. */
interface Scan {
  files: [string, StatResult][];
  dirs: [string, BigIntStats][];
  extra: StatResult[];
}

/**
 * Walks the config paths: directories recursively (each directory once, however it is reached),
 * entries sorted, dot-entries skipped. A missing path is kept with its error: it is part of the
 * state too.
 */
async function scan(paths: readonly string[], extraFiles: readonly string[], cache: DigestCache | undefined, now: number): Promise<Scan> {
  const top = await statAll([...paths, ...extraFiles]);
  const files: Scan['files'] = [];
  const dirs: Scan['dirs'] = [];
  const seen = new Set<string>();
  const visitDir = async (dir: string, st: BigIntStats): Promise<void> => {
    const id = `${st.dev}:${st.ino}`;
    if (seen.has(id)) return;
    seen.add(id);
    dirs.push([dir, st]);
    const entries = cache ? await cache.entries(dir, st, now) : (await listDir(dir)) ?? [];
    // A regular file that is not config needs no stat: it cannot be a directory. Symlinks and
    // entries of unknown type are stat'ed to see what they point to.
    const wanted = entries.filter((e) => !e.plain || CONFIG_NAME.test(e.name)).map((e) => path.join(dir, e.name));
    const stats = await statAll(wanted);
    for (let i = 0; i < wanted.length; i++) {
      const cst = stats[i]!;
      if (cst instanceof Error) continue;
      if (cst.isDirectory()) await visitDir(wanted[i]!, cst);
      else if (CONFIG_NAME.test(wanted[i]!)) files.push([wanted[i]!, cst]);
    }
  };
  for (let i = 0; i < paths.length; i++) {
    const st = top[i]!;
    if (st instanceof Error || !st.isDirectory()) files.push([paths[i]!, st]);
    else await visitDir(paths[i]!, st);
  }
  return { files, dirs, extra: top.slice(paths.length) };
}

async function hashScan(s: Scan, extraFiles: readonly string[], digests: Map<string, string> | undefined, cache: DigestCache | undefined, now: number): Promise<string> {
  const h = createHash('sha256');
  const add = (f: string, d: string) => h.update(f).update('\0').update(d).update('\0');
  // Awaited only when a file is read: an unchanged file costs no promise.
  const digestOf = (f: string, st: StatResult): string | Promise<string> =>
    cache ? cache.digestStat(f, st, now) : st instanceof Error ? errorCode(st) : fileDigest(f);
  for (const [f, st] of s.files) {
    const d = digestOf(f, st);
    add(f, typeof d === 'string' ? d : await d);
  }
  for (let i = 0; i < extraFiles.length; i++) {
    const f = extraFiles[i]!;
    let d = digestOf(f, s.extra[i]!);
    if (typeof d !== 'string') d = await d;
    digests?.set(f, d);
    add(f, d);
  }
  return h.digest('hex');
}

/**
 * A hash over the content of every config file under the paths (plus extra files, e.g.
 * certificates). When `digests` is given, it receives each extra file's fileDigest; with `cache`,
 * files and directories whose identity did not change are not read again.
 */
export async function contentHash(paths: readonly string[], extraFiles: readonly string[] = [], digests?: Map<string, string>, cache?: DigestCache): Promise<string> {
  const now = Date.now();
  return hashScan(await scan(paths, extraFiles, cache, now), extraFiles, digests, cache, now);
}

/** Which files and directories a scan saw (not their content): when it changes, the watches are set up again. */
function shapeOf(s: Scan, extraFiles: readonly string[]): string {
  const id = (p: string, st: StatResult) => (st instanceof Error ? `${p}!${st.code}` : `${p}@${st.dev}:${st.ino}`);
  return [...s.dirs.map(([d, st]) => id(d, st)), ...s.files.map(([f, st]) => id(f, st)), ...extraFiles.map((f, i) => id(f, s.extra[i]!))].join('\n');
}

/**
 * Filesystems (statfs f_type) where every change goes through this kernel, so inotify sees it:
 * ext2/3/4, xfs, btrfs, tmpfs, ramfs, f2fs, zfs, bcachefs. Anything else (NFS, SMB, FUSE, 9p,
 * virtiofs, overlayfs, other systems' numbering) may change without an event and keeps the short
 * poll.
 */
const LOCAL_FS = new Set([0xef53, 0x58465342, 0x9123683e, 0x01021994, 0x858458f6, 0xf2f52010, 0x2fc12fc1, 0xca451a4e]);

/**
 * Every this many polls the cache is dropped and every file is read and every directory listed (a
 * backstop for odd filesystems, e.g. a network filesystem whose cached attributes lag).
 */
const FULL_READ_EVERY = 60;

/** While a wanted watch is missing, every this many polls the watches are set up again. */
const REWATCH_EVERY = 20;

interface Watch {
  watcher: FSWatcher;
  /** dev:ino of the watched path when the watch was set up (a replaced directory needs a new watch). */
  id: string;
  /** Names whose events count, or all. */
  names: Set<string> | 'all';
  failed: boolean;
}

export class FileSource {
  readonly #paths: string[];
  readonly #watches = new Map<string, Watch>();
  #extra: string[] = [];
  /** fileDigest of each extra file, from the same read as #last. */
  #digests = new Map<string, string>();
  #timer: NodeJS.Timeout | undefined;
  #timerMs = 0;
  #debounce: NodeJS.Timeout | undefined;
  #last = '';
  #checking = false;
  #again = false;
  /** A watch event came: the next check lists the directories again and sets up the watches again. */
  #event = false;
  /** The next check sets up the watches again. */
  #rewatchDue = false;
  #closed = false;
  readonly #cache = new DigestCache();
  #polls = 0;
  /** The scan the watches were set up from, and its shape. */
  #scan: Scan | undefined;
  #shape = '';
  /** Set-ups of the watches run one after another. */
  #watching: Promise<void> = Promise.resolve();
  /** Whether every wanted watch is up, on a local filesystem (as of the last set-up). */
  #covered = false;
  /** A wanted watch could not be set up (as of the last set-up), or one failed since. */
  #watchMissing = false;

  constructor(paths: string[], private readonly onChange: () => void, private readonly opts: FileSourceOptions = {}) {
    this.#paths = paths.map((p) => path.resolve(p));
  }

  /** Files outside the config paths whose changes also count (certificate and key files). */
  setExtraFiles(files: string[]): void {
    const next = [...new Set(files)].sort();
    if (next.join('\n') === this.#extra.join('\n')) return;
    this.#extra = next;
    if (this.#scan) void this.#rewatch();
  }

  /**
   * The content digest (fileDigest) of an extra file as of the last check, so a caller that needs
   * it does not read the file again; undefined for a file not hashed yet. It may lag the disk by
   * one poll, but a change it has not seen yet fires onChange once it is seen.
   */
  digestOf(file: string): string | undefined {
    return this.#digests.get(file);
  }

  /** The backstop poll interval now in use: watchedPollMs while everything is watched, else pollMs. */
  get pollIntervalMs(): number {
    const covered = this.#covered && [...this.#watches.values()].every((w) => !w.failed);
    return covered ? this.opts.watchedPollMs ?? 5_000 : this.opts.pollMs ?? 500;
  }

  async start(): Promise<void> {
    const digests = new Map<string, string>();
    const now = Date.now();
    const s = await scan(this.#paths, this.#extra, this.#cache, now);
    this.#last = await hashScan(s, this.#extra, digests, this.#cache, now);
    this.#digests = digests;
    this.#scan = s;
    this.#shape = shapeOf(s, this.#extra);
    await this.#rewatch();
    this.#schedule();
  }

  close(): void {
    this.#closed = true;
    if (this.#timer) clearInterval(this.#timer);
    if (this.#debounce) clearTimeout(this.#debounce);
    for (const w of this.#watches.values()) w.watcher.close();
    this.#watches.clear();
  }

  /** (Re)starts the poll timer when the interval it should run at changed. */
  #schedule(): void {
    if (this.#closed) return;
    const ms = this.pollIntervalMs;
    if (this.#timer && this.#timerMs === ms) return;
    if (this.#timer) clearInterval(this.#timer);
    this.#timerMs = ms;
    this.#timer = setInterval(() => {
      this.#polls++;
      if (this.#polls % FULL_READ_EVERY === 0) this.#cache.clear();
      void this.#check(this.#watchMissing && this.#polls % REWATCH_EVERY === 0);
    }, ms);
    this.#timer.unref();
  }

  /**
   * Sets up the watches for the last scan. A new watch sees only what happens after it: when one
   * was added, the content is checked once more, so a change made between the scan and the watch
   * (a file written into a directory just created) is not left to the poll.
   */
  #rewatch(): Promise<void> {
    this.#watching = this.#watching.then(() => this.#setUpWatches()).then((added) => {
      if (added) void this.#check();
    }, () => {
      this.#covered = false;
      this.#watchMissing = true;
      this.#schedule();
    });
    return this.#watching;
  }

  /**
   * Watches directories (not files: a rename-over or symlink swap replaces the file's inode):
   * - each config path (it may be a file) and the directory of each extra file, and in their
   *   parents the path itself being created, removed or replaced (other names there, the parent
   *   may be /tmp, are none of our business);
   * - every directory the walk listed (subdirectories of the config paths);
   * - where a file reached through a symlink lives, for that file's name.
   * A watch whose path now names another directory (replaced, or a re-pointed symlink) is set up
   * again. Watches no longer wanted are closed.
   */
  async #setUpWatches(): Promise<boolean> {
    const s = this.#scan;
    if (this.#closed || !s) return false;
    const want = new Map<string, Set<string> | 'all'>();
    const add = (dir: string, name?: string): void => {
      const cur = want.get(dir);
      if (cur === 'all') return;
      if (name === undefined) want.set(dir, 'all');
      else if (cur) cur.add(name);
      else want.set(dir, new Set([name]));
    };
    for (const r of new Set([...this.#paths, ...this.#extra.map((f) => path.dirname(f))])) {
      add(r);
      if (path.dirname(r) !== r) add(path.dirname(r), path.basename(r));
    }
    for (const [d] of s.dirs) add(d);
    const files = [...s.files.filter(([, st]) => !(st instanceof Error)).map(([f]) => f), ...this.#extra];
    const real = await batch<string>(files, (f, cb) => realpath.native(f, cb));
    for (const r of real) if (typeof r === 'string') add(path.dirname(r), path.basename(r));
    const dirs = [...want.keys()];
    const ids = await statAll(dirs);
    const filesystems = await batch<StatsFs>(dirs, (d, cb) => statfs(d, cb));
    if (this.#closed) return false;
    for (const [d, w] of this.#watches) {
      if (!want.has(d)) {
        w.watcher.close();
        this.#watches.delete(d);
      }
    }
    let covered = true;
    let missing = false;
    let added = false;
    const watchFn = this.opts.watch ?? ((d: string, l: (event: string, name: string | null) => void) => watch(d, { persistent: false }, l));
    dirs.forEach((d, i) => {
      const st = ids[i]!;
      const fsInfo = filesystems[i]!;
      const cur = this.#watches.get(d);
      if (st instanceof Error) {
        // Missing: the short poll notices when it appears.
        cur?.watcher.close();
        this.#watches.delete(d);
        covered = false;
        missing = true;
        return;
      }
      if (fsInfo instanceof Error || !LOCAL_FS.has(fsInfo.type)) covered = false;
      const id = `${st.dev}:${st.ino}`;
      if (cur && !cur.failed && cur.id === id) {
        cur.names = want.get(d)!;
        return;
      }
      cur?.watcher.close();
      this.#watches.delete(d);
      const w: Watch = { watcher: undefined as unknown as FSWatcher, id, names: want.get(d)!, failed: false };
      try {
        w.watcher = watchFn(d, (_event, name) => {
          if (w.names === 'all' || name === null || w.names.has(name)) this.#kick();
        });
      } catch {
        // Out of inotify watches, or gone meanwhile: the short poll covers it.
        covered = false;
        missing = true;
        return;
      }
      w.watcher.on('error', () => {
        // The short poll covers it; the next check sets the watch up again.
        w.failed = true;
        this.#watchMissing = true;
        this.#schedule();
      });
      this.#watches.set(d, w);
      added = true;
    });
    this.#covered = covered;
    this.#watchMissing = missing;
    this.#schedule();
    return added;
  }

  #kick(): void {
    this.#event = true;
    if (this.#debounce) clearTimeout(this.#debounce);
    this.#debounce = setTimeout(() => this.#check(), this.opts.debounceMs ?? 50);
    this.#debounce.unref();
  }

  /** Compares the content with the last check's; `rewatch` sets up the watches again afterwards. */
  async #check(rewatch = false): Promise<void> {
    if (this.#closed) return;
    if (rewatch) this.#rewatchDue = true;
    if (this.#checking) { this.#again = true; return; }
    this.#checking = true;
    const event = this.#event;
    this.#event = false;
    rewatch = this.#rewatchDue || event;
    this.#rewatchDue = false;
    // An event says something changed: list the directories whatever their identity says.
    if (event) this.#cache.clearListings();
    try {
      const run = async (digests: Map<string, string>) => {
        const now = Date.now();
        const s = await scan(this.#paths, this.#extra, this.#cache, now);
        return { s, h: await hashScan(s, this.#extra, digests, this.#cache, now) };
      };
      let digests = new Map<string, string>();
      let { s, h } = await run(digests);
      // A writer that truncates then writes (shell redirection, writeFile) shows an empty or
      // partial file for a moment: fire only once the content has held still for a short
      // while, so a half-written file is never applied.
      for (let i = 0; h !== this.#last && i < 20; i++) {
        await new Promise((r) => setTimeout(r, this.opts.settleMs ?? 40));
        const next = new Map<string, string>();
        const again = await run(next);
        digests = next;
        s = again.s;
        if (again.h === h) break;
        h = again.h;
      }
      if (!this.#closed) this.#digests = digests;
      if (h !== this.#last && !this.#closed) {
        this.#last = h;
        this.onChange();
      }
      const shape = shapeOf(s, this.#extra);
      if (rewatch || shape !== this.#shape) {
        this.#scan = s;
        this.#shape = shape;
        await this.#rewatch();
      }
    } finally {
      this.#checking = false;
      if (this.#again) { this.#again = false; void this.#check(); }
    }
  }
}
