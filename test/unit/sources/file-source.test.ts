// FileSource's per-file digests of extra (certificate) files: what run's no-op check reuses
// instead of reading certificate files a second time; the identity caches; the backstop poll and
// the watches.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { FSWatcher } from 'node:fs';
import { mkdir, mkdtemp, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { FileSource, contentHash, fileDigest } from '../../../src/sources/file-source.js';

const sha = (s: string) => createHash('sha256').update(s).digest('hex');

test('fileDigest: sha256 of the content, or the error code for a missing file', async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-fs-'));
  try {
    await writeFile(path.join(dir, 'a.pem'), 'one');
    assert.equal(await fileDigest(path.join(dir, 'a.pem')), sha('one'));
    assert.equal(await fileDigest(path.join(dir, 'missing.pem')), '<ENOENT>');
    const digests = new Map<string, string>();
    const h1 = await contentHash([dir], [path.join(dir, 'a.pem')], digests);
    assert.deepEqual([...digests], [[path.join(dir, 'a.pem'), sha('one')]]);
    await writeFile(path.join(dir, 'a.pem'), 'two');
    assert.notEqual(await contentHash([dir], [path.join(dir, 'a.pem')]), h1);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('FileSource: a changed extra file fires onChange with its new digest already known', async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-fs-'));
  const cfg = path.join(dir, 'cfg');
  const cert = path.join(dir, 'tls.crt');
  let source: FileSource | undefined;
  try {
    await writeFile(path.join(dir, 'x.yaml'), 'a: 1\n');
    await writeFile(cert, 'first');
    const seen: (string | undefined)[] = [];
    let fired: () => void = () => {};
    const changed = new Promise<void>((r) => { fired = r; });
    source = new FileSource([cfg], () => { seen.push(source!.digestOf(cert)); fired(); }, { pollMs: 50, settleMs: 10 });
    source.setExtraFiles([cert]);
    await source.start();
    assert.equal(source.digestOf(cert), sha('first'));
    assert.equal(source.digestOf(path.join(dir, 'other.pem')), undefined);
    await writeFile(cert, 'second');
    const timer = setTimeout(() => fired(), 5_000);
    await changed;
    clearTimeout(timer);
    assert.deepEqual(seen, [sha('second')]);
  } finally {
    source?.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('DigestCache reads a file again only when its identity changes', async () => {
  const { DigestCache, fileDigest } = await import('../../../src/sources/file-source.js');
  const { mkdtemp, writeFile, rename, rm } = await import('node:fs/promises');
  const { tmpdir } = await import('node:os');
  const { join } = await import('node:path');
  const dir = await mkdtemp(join(tmpdir(), 'tg-digest-'));
  try {
    const f = join(dir, 'a.yaml');
    const cache = new DigestCache();
    await writeFile(f, 'one');
    assert.equal(await cache.digest(f), await fileDigest(f));
    // Same length, new content: mtime/ctime (and for the rename, the inode) change.
    await writeFile(f, 'two');
    assert.equal(await cache.digest(f), await fileDigest(f));
    await writeFile(join(dir, 'b.tmp'), 'six');
    await rename(join(dir, 'b.tmp'), f);
    assert.equal(await cache.digest(f), await fileDigest(f));
    await rm(f);
    assert.equal(await cache.digest(f), '<ENOENT>');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

// The backstop poll and the watches. A FileSource polls every pollMs while something is not
// watched and every watchedPollMs (here an hour: only a watch can see a change) while every
// directory that matters is watched on a local filesystem.

const HOUR = 3_600_000;

/** onChange calls, and a way to wait for the next one after an action (fails after 8 s). */
function changes() {
  let count = 0;
  let wake: () => void = () => {};
  return {
    fire: () => { count++; wake(); },
    get count() { return count; },
    async after(what: string, action: () => Promise<unknown>): Promise<void> {
      // Let the checks of the last change finish, so this change is seen for itself.
      await new Promise((r) => setTimeout(r, 150));
      const before = count;
      await action();
      const deadline = Date.now() + 8_000;
      while (count === before) {
        if (Date.now() > deadline) assert.fail(`no change seen after: ${what}`);
        await new Promise<void>((r) => { wake = r; setTimeout(r, 100); });
      }
    },
  };
}

async function until(what: string, cond: () => boolean): Promise<void> {
  const deadline = Date.now() + 8_000;
  while (!cond()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A watch function whose watchers never report anything (a filesystem inotify does not see), with a handle on them. */
function deafWatch() {
  const made: FSWatcher[] = [];
  const fn = () => {
    const w = new EventEmitter() as unknown as FSWatcher;
    Object.assign(w, { close() {}, ref() { return w; }, unref() { return w; } });
    made.push(w);
    return w;
  };
  return { fn, made };
}

test('FileSource: with no watch possible, the poll runs every pollMs and sees edits, new subdirectories and new entries', async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-fs-'));
  const seen = changes();
  const source = new FileSource([dir], seen.fire, {
    pollMs: 30, watchedPollMs: HOUR, settleMs: 10,
    watch: () => { throw Object.assign(new Error('no watches left'), { code: 'ENOSPC' }); },
  });
  try {
    await writeFile(path.join(dir, 'a.yaml'), 'a: 1\n');
    await source.start();
    assert.equal(source.pollIntervalMs, 30);
    await seen.after('an in-place edit', () => writeFile(path.join(dir, 'a.yaml'), 'a: 2\n'));
    await seen.after('a new subdirectory with a file', async () => {
      await mkdir(path.join(dir, 'sub'));
      await writeFile(path.join(dir, 'sub', 'b.yml'), 'b: 1\n');
    });
    await seen.after('a second file in it', () => writeFile(path.join(dir, 'sub', 'c.json'), '{}'));
    await seen.after('a file removed', () => rm(path.join(dir, 'sub', 'b.yml')));
    await seen.after('a rename-over', async () => {
      await writeFile(path.join(dir, 'new.tmp'), 'a: 3\n');
      await rename(path.join(dir, 'new.tmp'), path.join(dir, 'a.yaml'));
    });
    const n = seen.count;
    await writeFile(path.join(dir, 'notes.txt'), 'not config');
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(seen.count, n, 'a file that is not config changes nothing');
  } finally {
    source.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('FileSource: a watch that fails brings back the short poll, which sees what the watches miss', async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-fs-'));
  const deaf = deafWatch();
  const seen = changes();
  const source = new FileSource([dir], seen.fire, { pollMs: 30, watchedPollMs: HOUR, settleMs: 10, watch: deaf.fn });
  try {
    await writeFile(path.join(dir, 'a.yaml'), 'a: 1\n');
    await source.start();
    assert.ok(deaf.made.length > 0);
    // On a local filesystem every watch is up: the long interval. (Elsewhere the short one.)
    const watched = source.pollIntervalMs === HOUR;
    (deaf.made[0] as unknown as EventEmitter).emit('error', new Error('watch failed'));
    assert.equal(source.pollIntervalMs, 30);
    await seen.after('an edit no watch reports', () => writeFile(path.join(dir, 'a.yaml'), 'a: 2\n'));
    // The next check sets the watches up again, and the interval goes back.
    if (watched) await until('the long interval again', () => source.pollIntervalMs === HOUR);
  } finally {
    source.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('FileSource: a missing config path polls every pollMs until it appears', async () => {
  const root = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-fs-'));
  const dir = path.join(root, 'cfg');
  const seen = changes();
  const source = new FileSource([dir], seen.fire, { pollMs: 30, watchedPollMs: HOUR, settleMs: 10, watch: deafWatch().fn });
  try {
    await source.start();
    assert.equal(source.pollIntervalMs, 30);
    await seen.after('the directory created with a file', async () => {
      await mkdir(dir);
      await writeFile(path.join(dir, 'a.yaml'), 'a: 1\n');
    });
  } finally {
    source.close();
    await rm(root, { recursive: true, force: true });
  }
});

test('FileSource: with the long poll, the watches alone see subdirectories, symlink targets, ..data swaps and a re-pointed config path', async (t) => {
  const root = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-fs-'));
  const seen = changes();
  let source: FileSource | undefined;
  try {
    // cfg -> v1 (re-pointed later); v1/sub/b.yaml; v1/link.yaml -> elsewhere/real.yaml;
    // a Kubernetes-style mount for the certificate: tls.crt -> ..data/tls.crt, ..data -> ..v1.
    const v1 = path.join(root, 'v1');
    const elsewhere = path.join(root, 'elsewhere');
    const mount = path.join(root, 'mount');
    await mkdir(path.join(v1, 'sub'), { recursive: true });
    await mkdir(elsewhere);
    await mkdir(path.join(mount, '..v1'), { recursive: true });
    await writeFile(path.join(v1, 'a.yaml'), 'a: 1\n');
    await writeFile(path.join(v1, 'sub', 'b.yaml'), 'b: 1\n');
    await writeFile(path.join(elsewhere, 'real.yaml'), 'r: 1\n');
    await symlink(path.join(elsewhere, 'real.yaml'), path.join(v1, 'link.yaml'));
    await writeFile(path.join(mount, '..v1', 'tls.crt'), 'cert 1');
    await symlink('..v1', path.join(mount, '..data'));
    await symlink('..data/tls.crt', path.join(mount, 'tls.crt'));
    await symlink('v1', path.join(root, 'cfg'));
    const cert = path.join(mount, 'tls.crt');

    source = new FileSource([path.join(root, 'cfg')], seen.fire, { pollMs: HOUR, watchedPollMs: HOUR, settleMs: 10 });
    source.setExtraFiles([cert]);
    await source.start();
    if (source.pollIntervalMs !== HOUR) return t.skip(`${os.tmpdir()} is not on a filesystem the watches cover`);

    await seen.after('an edit in a subdirectory', () => writeFile(path.join(v1, 'sub', 'b.yaml'), 'b: 2\n'));
    await seen.after('a symlink target edited where it lives', () => writeFile(path.join(elsewhere, 'real.yaml'), 'r: 2\n'));
    await seen.after('a file added to a subdirectory created later', async () => {
      await mkdir(path.join(v1, 'sub', 'deeper'));
      await writeFile(path.join(v1, 'sub', 'deeper', 'c.yaml'), 'c: 1\n');
    });
    await seen.after('an edit in that new subdirectory', () => writeFile(path.join(v1, 'sub', 'deeper', 'c.yaml'), 'c: 2\n'));

    const swap = async (to: string, content: string) => {
      await mkdir(path.join(mount, to));
      await writeFile(path.join(mount, to, 'tls.crt'), content);
      await symlink(to, path.join(mount, '..data_tmp'));
      await rename(path.join(mount, '..data_tmp'), path.join(mount, '..data'));
    };
    await seen.after('a ..data swap', () => swap('..v2', 'cert 2'));
    assert.equal(source.digestOf(cert), sha('cert 2'));
    await seen.after('the certificate edited inside the new ..data', () => writeFile(path.join(mount, '..v2', 'tls.crt'), 'cert 3'));
    await seen.after('a second ..data swap', () => swap('..v3', 'cert 4'));
    assert.equal(source.digestOf(cert), sha('cert 4'));

    const v2 = path.join(root, 'v2');
    await mkdir(v2);
    await writeFile(path.join(v2, 'a.yaml'), 'a: 9\n');
    await seen.after('the config path re-pointed to another directory', async () => {
      await symlink('v2', path.join(root, 'cfg.tmp'));
      await rename(path.join(root, 'cfg.tmp'), path.join(root, 'cfg'));
    });
    await seen.after('an edit in the directory it points to now', () => writeFile(path.join(v2, 'a.yaml'), 'a: 10\n'));
    await seen.after('a file added there', () => writeFile(path.join(v2, 'b.yaml'), 'b: 1\n'));
    assert.equal(source.pollIntervalMs, HOUR);
  } finally {
    source?.close();
    await rm(root, { recursive: true, force: true });
  }
});

test('DigestCache keeps a directory listing while the directory identity holds', async () => {
  const { DigestCache } = await import('../../../src/sources/file-source.js');
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tg-digest-'));
  try {
    const cache = new DigestCache();
    await writeFile(path.join(dir, 'a.yaml'), '');
    await writeFile(path.join(dir, '.hidden.yaml'), '');
    const later = Date.now() + 60_000; // past the window in which recent times are not trusted
    const st1 = await stat(dir, { bigint: true });
    assert.deepEqual(await cache.entries(dir, st1, later), [{ name: 'a.yaml', plain: true }]);
    await writeFile(path.join(dir, 'b.yaml'), '');
    await symlink('a.yaml', path.join(dir, 'c.yaml'));
    // The stat from before the change: the listing is the remembered one.
    assert.deepEqual(await cache.entries(dir, st1, later), [{ name: 'a.yaml', plain: true }]);
    // A fresh stat shows a new identity (entries added change mtime and ctime): listed again.
    const st2 = await stat(dir, { bigint: true });
    assert.notEqual(st2.mtimeNs, st1.mtimeNs);
    assert.deepEqual(await cache.entries(dir, st2, later), [
      { name: 'a.yaml', plain: true }, { name: 'b.yaml', plain: true }, { name: 'c.yaml', plain: false },
    ]);
    // Within the recent window the listing is read again whatever the identity says.
    await writeFile(path.join(dir, 'd.yaml'), '');
    assert.equal((await cache.entries(dir, st2, Number(st2.mtimeNs / 1_000_000n))).length, 4);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
