# Job Result Service: `just` lists the recipes.
# Recipes that run a long-lived process `exec` it, so the signals sent to `just` reach it (not a shell).

set dotenv-load := false

export PATH := justfile_directory() + "/.venv/bin:" + env_var("PATH")

# List the recipes
[private]
default:
    @just --list --unsorted

# Install the locked dependencies into .venv
[group('setup')]
install:
    uv sync --frozen

# Build and start the local stack (MySQL 8.4, migrations, API on :8000, Redis)
[group('stack')]
up:
    mkdir -p data/mysql data/exports
    docker compose up --build --detach --wait
    @echo "API: http://127.0.0.1:8000  docs: http://127.0.0.1:8000/schema/swagger"

# Stop the local stack (data stays in ./data)
[group('stack')]
down:
    docker compose down

# Follow the service's JSON logs and MySQL's slow-query log together
[group('stack')]
logs:
    exec docker compose logs --follow api mysql

# Apply schema migrations to JOBRESULTS_DATABASE_URL
[group('run')]
migrate: install
    jobresults migrate

# Serve the API with Granian against JOBRESULTS_DATABASE_URL (no Docker)
[group('run')]
serve: install
    exec jobresults serve

# Run the tests (testcontainers mysql:8.4 with Docker, else JOBRESULTS_TEST_DATABASE_URL); without arguments: all, with the coverage floor
[group('test')]
test *args: install
    exec pytest {{ if args == "" { "--cov" } else { "" } }} {{ args }}

# Run the in-process tests only (no Granian servers, no CLI processes): the `slow` marker is left out
[group('test')]
test-fast *args: install
    exec pytest -m "not slow" {{ args }}

# k6 load scenario: 2 Granian workers (auth, rate limits, logs on) on JOBRESULTS_PERF_SERVER, 200 it/s for 30 s
[group('perf')]
perf rate="200" duration="30s": install
    exec python perf/run_perf.py --rate {{ rate }} --duration {{ duration }}

# Side by side: Express 5 + mysql2 + helmet, bare Litestar, the service (production and lean), wrk rounds + k6; DROPS jr_peers
[group('perf')]
perf-peers *args: install
    exec python perf/peers/compare.py --k6 --plot {{ args }}

# py-spy on both Granian workers while k6 runs the mix (or one of get, put, list, export) for 15 s
[group('perf')]
profile rate="800" mix="mix": install
    exec python perf/profile_load.py --rate {{ rate }} --mix {{ mix }}

# Lint: ruff, formatting, mypy, hadolint, compose file, OpenAPI drift
[group('test')]
lint: install
    ruff check .
    ruff format --check .
    mypy
    hadolint Containerfile
    docker-compose config --quiet
    jobresults openapi | diff -u openapi.json - || (echo "openapi.json is stale: run 'just openapi'" && exit 1)

# Fix what ruff can fix and format the code
[group('test')]
fix: install
    ruff check --fix .
    ruff format .

# Regenerate the checked-in OpenAPI document (openapi.json)
[group('test')]
openapi: install
    jobresults openapi --out openapi.json
