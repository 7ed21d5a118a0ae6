# vm-migration-operator image. Build: docker build -t vm-migration-operator:0.1.0 .
# Multi-stage: compile (TypeScript, native better-sqlite3) in a throw-away stage, run on the same
# pinned slim base with production dependencies only, as a non-root user, read-only root filesystem
# friendly (state lives on a volume or in PostgreSQL; /tmp is an emptyDir in the Deployment).
# Linted in the tests with dockerfilelint (test/unit/dockerfile.test.ts); it cannot be built there
# (no container engine on the test machines).
# Same pinned base in both stages so the native addon matches the runtime's Node ABI and glibc.
FROM node:22.12.0-bookworm-slim AS build
WORKDIR /app
# python3/make/g++: better-sqlite3 compiles its native addon when no prebuilt binary matches
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY src ./src
RUN npx tsc -p tsconfig.json && npm prune --omit=dev

FROM node:22.12.0-bookworm-slim
WORKDIR /app
ENV NODE_ENV=production
# zstd: the operator decompresses a copy of a compressed relay stream to hash the file bytes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends zstd \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/vmops \
 && chown 10001:10001 /var/lib/vmops
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist/src ./dist/src
# `plan` validates manifests with the CRD's own schema and CEL rules (src/api/validate.ts).
COPY crds ./crds
COPY package.json ./
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["node", "dist/src/cli/main.js"]
CMD ["run"]
