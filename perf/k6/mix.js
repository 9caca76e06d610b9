// Load scenario for the Job Result Service (issue 6): an open model at a constant arrival rate.
//
// Mix per iteration: 70% GET of a stored result, 15% PUT of a new result, 10% list by time range,
// 5% single-job export. Payloads are real job-result documents from ../shared/realdata (the files of
// 100 KB or less: 22 of the 32, the typical CI report), prepared by perf/run_perf.py.
//
// Environment: BASE_URL, API_KEY (a key with its own rate limit above RATE), LIMITED_KEY (a key held to
// the per-IP default), RATE (iterations/s, default 200), DURATION (default 30s), PAYLOADS (see below),
// SEEDED (number of stored job ids perf-seed-0 .. perf-seed-N-1), RANGE_FROM / RANGE_TO (RFC 3339).
// PAYLOADS is a JSON list of files, each one whole PUT body.
import http from "k6/http";
import { check } from "k6";
import { Counter } from "k6/metrics";

const BASE = __ENV.BASE_URL || "http://127.0.0.1:8000";
const RATE = parseInt(__ENV.RATE || "200", 10);
const DURATION = __ENV.DURATION || "30s";
const SEEDED = parseInt(__ENV.SEEDED || "1000", 10);
const AUTH = { Authorization: `Bearer ${__ENV.API_KEY}` };
const JSON_AUTH = Object.assign({ "Content-Type": "application/json" }, AUTH);
// PAYLOADS lists files that each hold one whole PUT body; read as bytes once per VU, in the init stage.
const bodies = JSON.parse(open(__ENV.PAYLOADS)).map((file) => open(file, "b"));
// MIX=get|put|list|export runs one operation alone (the capacity benchmark's GET series, cost per operation).
const ONLY = { get: 0, put: 0.7, list: 0.85, export: 0.95 }[__ENV.MIX];
const P99_MS = __ENV.P99_MS || "300";
// FILTERED=0.2: that share of iterations are filtered listings (two labels of the seeded rows, a status);
// the rest is the mix above. 0 (the default) leaves the mix as it is.
const FILTERED = parseFloat(__ENV.FILTERED || "0");
const WITH_LIMITER = __ENV.LIMITER !== "off";
const rateLimited = new Counter("rate_limited_responses");

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ["avg", "min", "med", "p(90)", "p(95)", "p(99)", "max"],
  scenarios: {
    mix: {
      executor: "constant-arrival-rate",
      exec: "mix",
      rate: RATE,
      timeUnit: "1s",
      duration: DURATION,
      preAllocatedVUs: Math.max(20, Math.ceil(RATE / 4)),
      maxVUs: Math.max(100, RATE * 2),
    },
    // One client without a limit of its own, at three times the 10/s per-IP default: it must see 429s.
    ...(WITH_LIMITER ? { limiter: {
      executor: "constant-arrival-rate",
      exec: "limiter",
      rate: 30,
      timeUnit: "1s",
      duration: "3s",
      startTime: "2s",
      preAllocatedVUs: 5,
      maxVUs: 20,
    } } : {}),
  },
  thresholds: {
    "http_req_duration{scenario:mix}": [`p(99)<${P99_MS}`],
    "http_req_failed{scenario:mix}": ["rate<0.001"],
    dropped_iterations: ["count<1"],
    ...(WITH_LIMITER ? { rate_limited_responses: ["count>0"] } : {}),
  },
};

function pick(n) {
  return Math.floor(Math.random() * n);
}

export function mix() {
  if (ONLY === undefined && FILTERED > 0 && Math.random() < FILTERED) {
    const res = http.get(
      `${BASE}/v1/job-results?created_from=${__ENV.RANGE_FROM}&created_to=${__ENV.RANGE_TO}&limit=50` +
        `&label=tool:tool-${pick(7)}&label=shard:${pick(4)}&status=succeeded`,
      { headers: AUTH, tags: { op: "filtered" } },
    );
    check(res, { "filtered 200": (r) => r.status === 200 });
    return;
  }
  const roll = ONLY === undefined ? Math.random() : ONLY;
  if (roll < 0.7) {
    const res = http.get(`${BASE}/v1/job-results/perf-seed-${pick(SEEDED)}`, { headers: AUTH, tags: { op: "get" } });
    check(res, { "get 200": (r) => r.status === 200 });
  } else if (roll < 0.85) {
    const id = `perf-${__VU}-${__ITER}-${Date.now()}`;
    const res = http.put(`${BASE}/v1/job-results/${id}`, bodies[pick(bodies.length)], {
      headers: JSON_AUTH,
      tags: { op: "put" },
    });
    check(res, { "put 201": (r) => r.status === 201 });
  } else if (roll < 0.95) {
    const res = http.get(
      `${BASE}/v1/job-results?created_from=${__ENV.RANGE_FROM}&created_to=${__ENV.RANGE_TO}&limit=50`,
      { headers: AUTH, tags: { op: "list" } },
    );
    check(res, { "list 200": (r) => r.status === 200 });
  } else {
    const res = http.post(
      `${BASE}/v1/job-results/perf-seed-${pick(SEEDED)}/exports`,
      '{"format":"json"}',
      { headers: JSON_AUTH, tags: { op: "export" } },
    );
    check(res, { "export 201": (r) => r.status === 201 });
  }
}

export function limiter() {
  const res = http.get(`${BASE}/v1/job-results?limit=1`, {
    headers: { Authorization: `Bearer ${__ENV.LIMITED_KEY}` },
    tags: { op: "limited" },
    responseCallback: http.expectedStatuses(200, 429),
  });
  if (res.status === 429) {
    rateLimited.add(1);
  }
}
