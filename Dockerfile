# Build: docker build -t vm-migration-operator:0.1.0 .
FROM node:22-bookworm-slim AS build
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends python3 make g++ && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json ./
RUN npm ci
COPY tsconfig.json ./
COPY src ./src
RUN npx tsc -p tsconfig.json && npm prune --omit=dev

FROM node:22-bookworm-slim
WORKDIR /app
ENV NODE_ENV=production
# zstd: the operator decompresses a copy of a compressed relay stream to hash the file bytes.
RUN apt-get update && apt-get install -y --no-install-recommends zstd && rm -rf /var/lib/apt/lists/*
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist/src ./dist/src
COPY package.json ./
# Non-root; state lives on a mounted volume.
RUN mkdir -p /var/lib/vmops && chown 10001:10001 /var/lib/vmops
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["node", "dist/src/cli/main.js"]
CMD ["run"]
