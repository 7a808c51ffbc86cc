// FileSource's per-file digests of extra (certificate) files: what run's no-op check reuses
// instead of reading certificate files a second time.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
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
