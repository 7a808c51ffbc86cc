/**
 * Watches config paths (files and directories) and calls back when their content changes.
 *
 * fs.watch is fast but unreliable across editors' rename-and-replace writes and the Kubernetes
 * `..data` symlink swap, so it only triggers a check; the check compares a hash of every file's
 * content (symlinks followed), and a periodic poll runs the same check as a backstop. Identical
 * content never fires the callback.
 */
import { createHash } from 'node:crypto';
import { promises as fsp, watch, type FSWatcher } from 'node:fs';
import * as path from 'node:path';

export interface FileSourceOptions {
  /** Backstop poll interval. */
  pollMs?: number;
  /** Quiet period after an event before checking (editors write in several steps). */
  debounceMs?: number;
  /** How long content must stay unchanged before it counts. */
  settleMs?: number;
}

async function listFiles(p: string, out: string[], seen: Set<string>): Promise<void> {
  let st;
  try {
    st = await fsp.stat(p);
  } catch {
    out.push(p); // a missing path is part of the state too
    return;
  }
  if (st.isDirectory()) {
    let real = p;
    try { real = await fsp.realpath(p); } catch { /* keep p */ }
    if (seen.has(real)) return;
    seen.add(real);
    const names = (await fsp.readdir(p).catch(() => [] as string[])).sort();
    for (const n of names) {
      if (n.startsWith('.')) continue; // ..data, ..2024_..., .git
      const child = path.join(p, n);
      const cst = await fsp.stat(child).catch(() => undefined);
      if (!cst) continue;
      if (cst.isDirectory()) await listFiles(child, out, seen);
      else if (/\.(ya?ml|json)$/i.test(n)) out.push(child);
    }
  } else out.push(p);
}

/** SHA-256 of one file's content, or `<ENOENT>` (the error code) when it cannot be read. */
export async function fileDigest(file: string): Promise<string> {
  try {
    return createHash('sha256').update(await fsp.readFile(file)).digest('hex');
  } catch (e) {
    return `<${(e as { code?: string }).code ?? 'error'}>`;
  }
}

/** A file whose times are this recent is read even when its identity looks unchanged. */
const RECENT_MS = 2_000;

/**
 * Digests remembered by file identity (inode, size, mtime and ctime in ns, symlinks followed), so a
 * poll of unchanged files costs a stat each instead of a read and a SHA-256. Any write changes
 * mtime/ctime, and a `..data` symlink swap or rename-over changes the inode.
 */
export class DigestCache {
  readonly #byFile = new Map<string, { stamp: string; digest: string }>();

  async digest(file: string): Promise<string> {
    let stamp: string;
    let changedMs: number;
    try {
      const st = await fsp.stat(file, { bigint: true });
      stamp = `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`;
      changedMs = Number(st.ctimeNs > st.mtimeNs ? st.ctimeNs : st.mtimeNs) / 1e6;
    } catch (e) {
      this.#byFile.delete(file);
      return `<${(e as { code?: string }).code ?? 'error'}>`;
    }
    const hit = this.#byFile.get(file);
    // File times tick with the kernel's coarse clock (milliseconds), so two same-size writes in
    // one tick look alike: a file changed in the last seconds is always read.
    if (hit && hit.stamp === stamp && Date.now() - changedMs > RECENT_MS) return hit.digest;
    const digest = await fileDigest(file);
    this.#byFile.set(file, { stamp, digest });
    return digest;
  }

  /** Forget everything (the next digest of each file reads it again). */
  clear(): void {
    this.#byFile.clear();
  }
}

/**
 * A hash over the content of every config file under the paths (plus extra files, e.g.
 * certificates). When `digests` is given, it receives each extra file's fileDigest; with `cache`,
 * files whose identity did not change are not read again.
 */
export async function contentHash(paths: readonly string[], extraFiles: readonly string[] = [], digests?: Map<string, string>, cache?: DigestCache): Promise<string> {
  const files: string[] = [];
  const seen = new Set<string>();
  for (const p of paths) await listFiles(p, files, seen);
  const h = createHash('sha256');
  const add = (f: string, d: string) => h.update(f).update('\0').update(d).update('\0');
  const digestOf = (f: string) => (cache ? cache.digest(f) : fileDigest(f));
  for (const f of files) add(f, await digestOf(f));
  for (const f of extraFiles) {
    const d = await digestOf(f);
    digests?.set(f, d);
    add(f, d);
  }
  return h.digest('hex');
}

/** Every this many polls the cache is dropped and every file is read (a backstop for odd filesystems). */
const FULL_READ_EVERY = 60;

export class FileSource {
  readonly #paths: string[];
  readonly #watchers: FSWatcher[] = [];
  #extra: string[] = [];
  /** fileDigest of each extra file, from the same read as #last. */
  #digests = new Map<string, string>();
  #timer: NodeJS.Timeout | undefined;
  #debounce: NodeJS.Timeout | undefined;
  #last = '';
  #checking = false;
  #again = false;
  #closed = false;
  readonly #cache = new DigestCache();
  #polls = 0;

  constructor(paths: string[], private readonly onChange: () => void, private readonly opts: FileSourceOptions = {}) {
    this.#paths = paths.map((p) => path.resolve(p));
  }

  /** Files outside the config paths whose changes also count (certificate and key files). */
  setExtraFiles(files: string[]): void {
    const next = [...new Set(files)].sort();
    if (next.join('\n') === this.#extra.join('\n')) return;
    this.#extra = next;
    this.#rewatch();
  }

  /**
   * The content digest (fileDigest) of an extra file as of the last check, so a caller that needs
   * it does not read the file again; undefined for a file not hashed yet. It may lag the disk by
   * one poll, but a change it has not seen yet fires onChange once it is seen.
   */
  digestOf(file: string): string | undefined {
    return this.#digests.get(file);
  }

  async start(): Promise<void> {
    const digests = new Map<string, string>();
    this.#last = await contentHash(this.#paths, this.#extra, digests, this.#cache);
    this.#digests = digests;
    this.#rewatch();
    this.#timer = setInterval(() => {
      if (++this.#polls % FULL_READ_EVERY === 0) this.#cache.clear();
      void this.#check();
    }, this.opts.pollMs ?? 500);
    this.#timer.unref();
  }

  close(): void {
    this.#closed = true;
    if (this.#timer) clearInterval(this.#timer);
    if (this.#debounce) clearTimeout(this.#debounce);
    for (const w of this.#watchers.splice(0)) w.close();
  }

  #rewatch(): void {
    for (const w of this.#watchers.splice(0)) w.close();
    if (this.#closed) return;
    // Watch directories (not files): a rename-over or symlink swap replaces the file's inode.
    const dirs = new Set<string>();
    for (const p of this.#paths) dirs.add(p);
    for (const f of this.#extra) dirs.add(path.dirname(f));
    for (const d of dirs) {
      try {
        const w = watch(d, { recursive: false, persistent: false }, () => this.#kick());
        w.on('error', () => { /* the poll covers it */ });
        this.#watchers.push(w);
      } catch { /* missing path: the poll notices when it appears */ }
      try {
        // The parent sees the watched path itself being created, removed or replaced; other
        // names there (the parent may be /tmp) are none of our business.
        const parent = path.dirname(d);
        const name = path.basename(d);
        const w = watch(parent, { persistent: false }, (_event, changed) => {
          if (changed === null || changed === name) this.#kick();
        });
        w.on('error', () => {});
        this.#watchers.push(w);
      } catch { /* ignore */ }
    }
  }

  #kick(): void {
    if (this.#debounce) clearTimeout(this.#debounce);
    this.#debounce = setTimeout(() => this.#check(), this.opts.debounceMs ?? 50);
    this.#debounce.unref();
  }

  async #check(): Promise<void> {
    if (this.#closed) return;
    if (this.#checking) { this.#again = true; return; }
    this.#checking = true;
    try {
      let digests = new Map<string, string>();
      let h = await contentHash(this.#paths, this.#extra, digests, this.#cache);
      // A writer that truncates then writes (shell redirection, writeFile) shows an empty or
      // partial file for a moment: fire only once the content has held still for a short
      // while, so a half-written file is never applied.
      for (let i = 0; h !== this.#last && i < 20; i++) {
        await new Promise((r) => setTimeout(r, this.opts.settleMs ?? 40));
        const next = new Map<string, string>();
        const again = await contentHash(this.#paths, this.#extra, next, this.#cache);
        digests = next;
        if (again === h) break;
        h = again;
      }
      if (!this.#closed) this.#digests = digests;
      if (h !== this.#last && !this.#closed) {
        this.#last = h;
        this.onChange();
      }
    } finally {
      this.#checking = false;
      if (this.#again) { this.#again = false; void this.#check(); }
    }
  }
}
