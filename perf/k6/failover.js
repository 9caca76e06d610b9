// The failover run's load (perf/failover.py): the k6 mix of perf/k6/mix.js (70% GET, 15% PUT, 10% list,
// 5% single-job export) spread over several service replicas, at a constant arrival rate.
//
// No thresholds here: failover.py judges the run from k6's per-request output (--out json), so every
// request is tagged with its operation (op), the replica it went to (replica) and, for a PUT, the body
// file it sent (body), which failover.py reads back afterwards.
//
// Environment: BASE_URLS (comma-separated), API_KEY, RATE (iterations/s), DURATION, PAYLOADS (JSON list of
// files, each one whole PUT body), SEEDED (stored ids perf-seed-0 .. perf-seed-N-1), RANGE_FROM / RANGE_TO.
import http from "k6/http";

const BASES = (__ENV.BASE_URLS || "http://127.0.0.1:8000").split(",");
const RATE = parseInt(__ENV.RATE || "50", 10);
const SEEDED = parseInt(__ENV.SEEDED || "200", 10);
const AUTH = { Authorization: `Bearer ${__ENV.API_KEY}` };
const JSON_AUTH = Object.assign({ "Content-Type": "application/json" }, AUTH);
const bodies = JSON.parse(open(__ENV.PAYLOADS)).map((file) => open(file, "b"));

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ["avg", "min", "med", "p(90)", "p(95)", "p(99)", "max"],
  scenarios: {
    mix: {
      executor: "constant-arrival-rate",
      exec: "mix",
      rate: RATE,
      timeUnit: "1s",
      duration: __ENV.DURATION || "40s",
      preAllocatedVUs: Math.max(20, Math.ceil(RATE / 2)),
      maxVUs: Math.max(100, RATE * 4),
    },
  },
};

function pick(n) {
  return Math.floor(Math.random() * n);
}

export function mix() {
  const replica = pick(BASES.length);
  const base = BASES[replica];
  const tags = { replica: String(replica) };
  const params = (op, headers) => ({ headers, timeout: "20s", tags: Object.assign({ op }, tags) });
  const roll = Math.random();
  if (roll < 0.7) {
    http.get(`${base}/v1/job-results/perf-seed-${pick(SEEDED)}`, params("get", AUTH));
  } else if (roll < 0.85) {
    const body = pick(bodies.length);
    const p = params("put", JSON_AUTH);
    p.tags.body = String(body);
    http.put(`${base}/v1/job-results/failover-${__VU}-${__ITER}-${Date.now()}`, bodies[body], p);
  } else if (roll < 0.95) {
    http.get(
      `${base}/v1/job-results?created_from=${__ENV.RANGE_FROM}&created_to=${__ENV.RANGE_TO}&limit=50`,
      params("list", AUTH),
    );
  } else {
    http.post(`${base}/v1/job-results/perf-seed-${pick(SEEDED)}/exports`, '{"format":"json"}', params("export", JSON_AUTH));
  }
}
