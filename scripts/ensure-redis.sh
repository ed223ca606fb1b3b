#!/usr/bin/env bash
# Make sure a Redis server answers at $REDIS_URL's host and port (default 127.0.0.1:6379;
# from the environment, else from ./.env). If none does, install Debian's redis-server
# when missing and start one with append-only persistence under ./run/redis, so accepted
# messages survive a restart.
set -euo pipefail

url="${REDIS_URL:-}"
if [ -z "$url" ] && [ -f .env ]; then
  url="$(sed -n 's/^REDIS_URL=//p' .env | tail -n 1)"
  url="${url%\"}"; url="${url#\"}"; url="${url%\'}"; url="${url#\'}"
fi
url="${url:-redis://127.0.0.1:6379/0}"
case "$url" in
  redis://*) ;;
  *) echo "redis: $url is not a plain redis:// URL; not checked here"; exit 0 ;;
esac
rest="${url#redis://}"; rest="${rest%%/*}"
auth=""; password=""
if [ "${rest#*@}" != "$rest" ]; then
  userinfo="${rest%@*}"; rest="${rest##*@}"
  user="${userinfo%%:*}"; password="${userinfo#*:}"
  if [ "$password" = "$userinfo" ]; then auth="AUTH $user"            # redis://secret@host
  elif [ -n "$user" ]; then auth="AUTH $user $password"                 # redis://user:pw@host
  else auth="AUTH $password"; fi                                          # redis://:pw@host
fi
host="${rest%%:*}"; port="${rest##*:}"
[ "$port" = "$rest" ] && port=6379
[ -z "$host" ] && host=127.0.0.1

answers() {
  (
    exec 3<>"/dev/tcp/$host/$port"
    { [ -n "$auth" ] && printf '%s\r\n' "$auth"; printf 'PING\r\nQUIT\r\n'; } >&3
    timeout 2 cat <&3 | grep -q PONG
  ) 2>/dev/null
}

if answers; then
  echo "redis: answering at $host:$port"
  exit 0
fi
if [ "$host" != "127.0.0.1" ] && [ "$host" != "localhost" ]; then
  echo "redis: nothing answers at $host:$port (or its password is wrong) and it is not local; start it there" >&2
  exit 1
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis: installing Debian's redis-server"
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq redis-server >/dev/null
  # The package starts its own service where the machine runs services: that one then
  # holds the port, with Debian's configuration (no append-only file) instead of ours.
  if answers; then
    echo "redis: Debian's redis-server service now answers at $host:$port, with its own" \
      "configuration (/etc/redis/redis.conf: set appendonly yes and appendfsync always" \
      "there for accepted messages to survive a crash)"
    exit 0
  fi
fi
dir="$(pwd)/run/redis"
mkdir -p "$dir"
secret=(); [ -n "$password" ] && secret=(--requirepass "$password")  # as REDIS_URL says
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --dir "$dir" \
  --appendonly yes --appendfsync always --logfile "$dir/redis.log" "${secret[@]}"
for _ in $(seq 50); do answers && { echo "redis: started at $host:$port ($dir)"; exit 0; }; sleep 0.1; done
echo "redis: failed to start, see $dir/redis.log" >&2
exit 1
