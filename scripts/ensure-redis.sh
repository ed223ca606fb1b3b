#!/usr/bin/env bash
# Make sure a Redis server answers at $REDIS_URL's host and port (default 127.0.0.1:6379).
# If none does, install Debian's redis-server when missing and start one with append-only
# persistence under ./run/redis, so accepted messages survive a restart.
set -euo pipefail

url="${REDIS_URL:-redis://127.0.0.1:6379/0}"
hostport="${url#*://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"
[ "$port" = "$hostport" ] && port=6379

answers() { (exec 3<>"/dev/tcp/$host/$port" && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG) 2>/dev/null; }

if answers; then
  echo "redis: answering at $host:$port"
  exit 0
fi
if [ "$host" != "127.0.0.1" ] && [ "$host" != "localhost" ]; then
  echo "redis: nothing answers at $host:$port and it is not local; start it there" >&2
  exit 1
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis: installing Debian's redis-server"
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq redis-server >/dev/null
fi
dir="$(pwd)/run/redis"
mkdir -p "$dir"
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --dir "$dir" \
  --appendonly yes --appendfsync always --logfile "$dir/redis.log"
for _ in $(seq 50); do answers && { echo "redis: started at $host:$port ($dir)"; exit 0; }; sleep 0.1; done
echo "redis: failed to start, see $dir/redis.log" >&2
exit 1
