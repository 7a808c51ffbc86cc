#include "fast_route.h"

#include <stdlib.h>
#include <string.h>

/* Slots are counted in by JS and by the relay thread at once (atomically, see relay.c). */
static int32_t slot_load(const int32_t *slots, uint32_t i) {
  return __atomic_load_n(&slots[i], __ATOMIC_RELAXED);
}

/* xorshift64*: a uniform double in [0, 1). */
static double uniform01(uint64_t *s) {
  uint64_t x = *s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return (double)((x * 0x2545F4914F6CDD1DULL) >> 11) * (1.0 / 9007199254740992.0);
}

void fast_cluster_ready(struct fast_cluster *c) {
  double total = 0;
  for (uint32_t i = 0; i < c->n; i++) {
    c->weight[i] = c->hosts[i].weight > 0 ? c->hosts[i].weight : 0;
    total += c->weight[i];
  }
  if (total == 0) {
    for (uint32_t i = 0; i < c->n; i++) c->weight[i] = 1;
    total = c->n;
  }
  double acc = 0;
  c->uniform = true;
  for (uint32_t i = 0; i < c->n; i++) {
    acc += c->weight[i];
    c->cum[i] = acc;
    c->cur[i] = 0;
    if (c->weight[i] != c->weight[0]) c->uniform = false;
  }
  c->total = total;
}

/* The first index whose running sum exceeds r * total (load-balancer.ts drawIndex). */
static uint32_t draw_index(const struct fast_cluster *c, double r) {
  double x = r * c->total;
  uint32_t lo = 0, hi = c->n - 1;
  while (lo < hi) {
    uint32_t mid = (lo + hi) >> 1;
    if (c->cum[mid] > x) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

static uint32_t draw(const struct fast_cluster *c, uint64_t *rng) {
  double r = uniform01(rng);
  if (c->uniform) {
    uint32_t i = (uint32_t)(r * c->n);
    return i < c->n ? i : c->n - 1;
  }
  return draw_index(c, r);
}

static uint32_t pick_host(struct fast_cluster *c, const int32_t *slots, uint64_t *rng) {
  if (c->n == 1) return 0;
  switch (c->policy) {
    case LB_ROUND_ROBIN: {
      if (c->uniform) {
        uint32_t h = c->rr_next % c->n;
        c->rr_next = (c->rr_next + 1) % c->n;
        return h;
      }
      /* Smooth weighted round robin: raise each by its weight, take the highest, lower it by the total. */
      uint32_t best = 0;
      for (uint32_t i = 0; i < c->n; i++) {
        c->cur[i] += c->weight[i];
        if (c->cur[i] > c->cur[best]) best = i;
      }
      c->cur[best] -= c->total;
      return best;
    }
    case LB_RANDOM:
      return draw(c, rng);
    default: {
      /* Power of two choices by load per unit of weight. */
      uint32_t a = draw(c, rng), b = draw(c, rng);
      if (b == a) b = (a + 1) % c->n;
      double la = (slot_load(slots, c->hosts[a].slot) + 1) / c->weight[a];
      double lb = (slot_load(slots, c->hosts[b].slot) + 1) / c->weight[b];
      return lb < la ? b : a;
    }
  }
}

bool fast_pick(struct fast_route *rt, const int32_t *slots, size_t nslots, uint64_t *rng, struct fast_pick *out) {
  if (rt->n == 0 || !slots) return false;
  uint32_t t = 0;
  if (rt->n > 1) {
    /* tcp-proxy.ts pickWeighted: r in [0, total), walk down the list. */
    if (rt->total <= 0) return false;
    double r = uniform01(rng) * rt->total;
    t = rt->n - 1;
    for (uint32_t i = 0; i < rt->n; i++) {
      r -= rt->weight[i];
      if (r < 0) {
        t = i;
        break;
      }
    }
  }
  struct fast_cluster *c = &rt->clusters[t];
  if (c->n == 0 || c->slot >= nslots) return false;
  for (uint32_t i = 0; i < c->n; i++) if (c->hosts[i].slot >= nslots) return false;
  if (c->max_conns >= 0 && slot_load(slots, c->slot) >= c->max_conns) return false;
  out->target = t;
  out->host = pick_host(c, slots, rng);
  return true;
}

struct fast_route *fast_route_new(uint32_t id, uint32_t n) {
  struct fast_route *rt = calloc(1, sizeof *rt);
  if (!rt) return NULL;
  rt->id = id;
  rt->n = n;
  rt->weight = calloc(n ? n : 1, sizeof *rt->weight);
  rt->clusters = calloc(n ? n : 1, sizeof *rt->clusters);
  if (!rt->weight || !rt->clusters) {
    free(rt->weight);
    free(rt->clusters);
    free(rt);
    return NULL;
  }
  return rt;
}

void fast_route_unref(struct fast_route *rt) {
  if (!rt || --rt->refs > 0) return;
  for (uint32_t i = 0; i < rt->n; i++) {
    struct fast_cluster *c = &rt->clusters[i];
    free(c->hosts);
    free(c->weight);
    free(c->cum);
    free(c->cur);
  }
  free(rt->clusters);
  free(rt->weight);
  free(rt);
}

static uint32_t hash(const char *s, int len) {
  uint32_t h = 2166136261u;
  for (int i = 0; i < len; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
  return h;
}

struct fast_route *fast_lookup(const struct fast_table *t, const char *sni, int len) {
  for (struct fast_entry *e = t->buckets[len < 0 ? 0 : hash(sni, len) % FAST_BUCKETS]; e; e = e->next) {
    if (e->len == len && (len < 0 || memcmp(e->sni, sni, (size_t)len) == 0)) return e->route;
  }
  return NULL;
}

bool fast_learn(struct fast_table *t, const char *sni, int len, struct fast_route *rt, uint32_t *replaced_started) {
  *replaced_started = 0;
  struct fast_entry **b = &t->buckets[len < 0 ? 0 : hash(sni, len) % FAST_BUCKETS];
  for (struct fast_entry *e = *b; e; e = e->next) {
    if (e->len == len && (len < 0 || memcmp(e->sni, sni, (size_t)len) == 0)) {
      rt->refs++;
      *replaced_started = e->route->started;
      fast_route_unref(e->route);
      e->route = rt;
      return true;
    }
  }
  if (t->count >= FAST_MAX_ENTRIES) return false;
  struct fast_entry *e = malloc(sizeof *e + (len > 0 ? (size_t)len : 0));
  if (!e) return false;
  e->len = len;
  if (len > 0) memcpy(e->sni, sni, (size_t)len);
  e->route = rt;
  rt->refs++;
  e->next = *b;
  *b = e;
  t->count++;
  return true;
}

void fast_table_free(struct fast_table *t) {
  if (!t) return;
  for (int i = 0; i < FAST_BUCKETS; i++) {
    while (t->buckets[i]) {
      struct fast_entry *e = t->buckets[i];
      t->buckets[i] = e->next;
      fast_route_unref(e->route);
      free(e);
    }
  }
  free(t);
}
