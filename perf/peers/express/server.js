// The seed's stack, as the side-by-side benchmark's reference: Express 5 + mysql2 + helmet, a cluster
// of WORKERS processes serving the service's one-row GET shape from the same table.
// PORT, WORKERS and DATABASE_URL (mysql://user:pass@host:port/db) come from the environment.
"use strict";
const cluster = require("node:cluster");
const crypto = require("node:crypto");

const workers = Number(process.env.WORKERS || 2);
const port = Number(process.env.PORT || 3000);

if (cluster.isPrimary) {
  for (let i = 0; i < workers; i++) cluster.fork();
  cluster.on("exit", (worker, code) => {
    if (code !== 0) console.error(`worker ${worker.process.pid} exited with ${code}`);
  });
  const stop = () => {
    for (const id in cluster.workers) cluster.workers[id].kill("SIGTERM");
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
} else {
  const express = require("express");
  const helmet = require("helmet");
  const mysql = require("mysql2/promise");

  const url = new URL(process.env.DATABASE_URL);
  const pool = mysql.createPool({
    host: url.hostname,
    port: Number(url.port || 3306),
    user: decodeURIComponent(url.username),
    password: decodeURIComponent(url.password),
    database: url.pathname.slice(1),
    connectionLimit: 6,
    charset: "utf8mb4",
    timezone: "Z",
    dateStrings: true,
  });
  const app = express();
  app.disable("x-powered-by");
  app.use(helmet());
  app.get("/healthz", (req, res) => res.json({ status: "ok" }));
  app.get("/v1/job-results/:jobId", async (req, res) => {
    try {
      const [rows] = await pool.query(
        "SELECT job_id, status, version, created_at, updated_at, result_data FROM job_results WHERE job_id = ?",
        [req.params.jobId],
      );
      if (rows.length === 0) return res.status(404).type("application/problem+json").send({ title: "Not Found" });
      const row = rows[0];
      const result = typeof row.result_data === "string" ? JSON.parse(row.result_data) : row.result_data;
      const rfc3339 = (s) => s.replace(" ", "T") + "Z";
      res.set("ETag", `"${row.version}"`);
      res.json({
        job_id: String(row.job_id),
        status: row.status,
        result,
        created_at: rfc3339(row.created_at),
        updated_at: rfc3339(row.updated_at),
      });
    } catch (err) {
      res.status(500).send({ title: "Internal Server Error", id: crypto.randomUUID() });
    }
  });
  app.listen(port, "127.0.0.1");
}
