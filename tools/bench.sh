#!/usr/bin/env bash
# Benchmarks chatloop with tools/loadgen and compares fan-out cost with the kernel's floor.
#
#   tools/bench.sh                 # every scenario
#   tools/bench.sh fanout1k floor1k rest
#
# Scenarios: fanout1k (1 room x 1000 members @ 20 msg/s), fanout10x50 (10 x 50 @ 100 msg/s/room),
# floor1k, floor10x50 (same shapes over raw loopback sockets), relay1k, relay10x50 (the same
# with each message's timestamp taken on the loadgen's CPU and relayed to the writer over one
# more loopback connection, as a chat message reaches a server), rest (POST /sessions),
# restfloor (the same load against `loadgen httpfloor`, a minimal HTTP server), join (connect storm into a 100-member room), idle (as many sockets as `ulimit -Hn` allows),
# over TLS (chatloop with --tls-cert/--tls-key, a test CA and certificate made here with
# `openssl`, loadgen --tls-ca): wss1k and wss10x50 (fanout1k and fanout10x50 over wss; run them
# with the plain ones to get the ratio of CPU per delivery), connect and tlsconnect (a new
# connection per request, GET /health, BENCH_REST_CLIENTS clients: connections per second; with
# both, tlsconnect reports the server CPU per TLS handshake as the difference), idlewss (idle
# over wss: RSS per idle wss connection),
# and cluster mode: cluster0 (a single node without Redis), cluster1 (one node with Redis),
# cluster2 (two nodes sharing one Redis, members split between them), all 10 x 50 at
# BENCH_CLUSTER_RATE msg/s/room (100), unpinned (three or four processes share the two
# cores), server CPU summed over the nodes and redis-server. Needs redis-server.
# cluster1s / cluster2s: the same as cluster1 / cluster2 on a Redis Cluster of one master
# (--cluster-enabled yes, every slot on it; needs redis-cli): the cost of Redis's cluster mode.
# cluster1s3 / cluster2s3: the same on a Redis Cluster of three masters (redis-cli --cluster
# create; the nodes get its redis-cluster:// seed list): rooms spread over the shards, CPU
# summed over the nodes and the three redis-servers.
#
# Environment: BENCH_DURATION (5s), BENCH_WARMUP (1s), BENCH_IDLE_HOLD (5s),
# BENCH_IDLE_CONNS (hard fd limit minus 1000), BENCH_REST_CLIENTS (16), BENCH_JOINS (2000),
# BENCH_REPEAT (1: run the whole list that many times; numbers on a shared VM vary run to run),
# BENCH_OUT (target/bench), BENCH_SERVER_ARGS (extra chatloop flags), BENCH_SERVER_BIN (another
# server binary speaking the same contract), BENCH_NO_BUILD=1 (skip both cargo builds),
# BENCH_LIMIT_ARGS (default: "--create-rate 0 --max-connections-per-ip 0 --max-rooms-per-session 0
# --upgrade-rate 0", turning off chatloop's per-address and per-session budgets, which a load
# generator on one address would hit at once; set it empty for a server binary without those
# flags).
#
# Each server scenario gets a fresh chatloop (127.0.0.1, --port 0), pinned to CPU 0 (loadgen on
# CPU 1) when there are two cores, so one scenario's leftovers (sessions, freed memory, closing
# sockets) do not skew the next. Only the server started here is stopped, on exit too.
# Every wait below is bounded.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DUR=${BENCH_DURATION:-5s}
WARMUP=${BENCH_WARMUP:-1s}
IDLE_HOLD=${BENCH_IDLE_HOLD:-5s}
REST_CLIENTS=${BENCH_REST_CLIENTS:-16}
JOINS=${BENCH_JOINS:-2000}
JOIN_CONCURRENCY=${BENCH_JOIN_CONCURRENCY:-4}
OUT=${BENCH_OUT:-$ROOT/target/bench}
CLUSTER_RATE=${BENCH_CLUSTER_RATE:-100}
# shellcheck disable=SC2206 # word splitting intended: a list of flags
LIMIT_ARGS=(${BENCH_LIMIT_ARGS---create-rate 0 --max-connections-per-ip 0 --max-rooms-per-session 0 --upgrade-rate 0})
ALL=(fanout1k fanout10x50 floor1k floor10x50 relay1k relay10x50 rest restfloor join idle cluster0 cluster1 cluster2 cluster1s cluster2s cluster1s3 cluster2s3
    wss1k wss10x50 connect tlsconnect idlewss)
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -eq 0 ] && SCENARIOS=("${ALL[@]}")
for s in "${SCENARIOS[@]}"; do
    case " ${ALL[*]} " in *" $s "*) ;; *) echo "unknown scenario '$s'; known: ${ALL[*]}" >&2; exit 2 ;; esac
done
mkdir -p "$OUT"

# shellcheck source=tools/lib/server.sh
. "$ROOT/tools/lib/server.sh"
release_binaries "${BENCH_NO_BUILD:-}" "${BENCH_SERVER_BIN:-}"
HARD_NOFILE=$(ulimit -Hn)
[ "$HARD_NOFILE" = unlimited ] && HARD_NOFILE=1048576
IDLE_CONNS=${BENCH_IDLE_CONNS:-$((HARD_NOFILE - 1000))}

SRV_PIN=() LG_PIN=() FLOOR_PIN=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    SRV_PIN=(taskset -c 0) LG_PIN=(taskset -c 1) FLOOR_PIN=(--writer-cpu 0 --reader-cpu 1)
    echo "== pinning: chatloop on CPU 0, loadgen on CPU 1" >&2
else
    echo "== fewer than two cores (or no taskset): no pinning; numbers will be noisier" >&2
fi

SERVER_PREFIX=("${SRV_PIN[@]}")
CHATLOOP_BIN=$SERVER_BIN
REDIS_PID="" NODE2_PID=""
stop_cluster() {
    local p
    # REDIS_PID: one pid, or several (a sharded cluster) separated by spaces.
    # shellcheck disable=SC2086
    for p in "$NODE2_PID" $REDIS_PID; do
        if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
            kill -TERM "$p" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$p" 2>/dev/null || true
            wait "$p" 2>/dev/null || true
        fi
    done
    NODE2_PID="" REDIS_PID=""
}
trap 'stop_chatloop; stop_cluster' EXIT
trap 'exit 130' INT TERM

# TLS scenarios: TLS_SRV (server flags) and TLS_LG (loadgen flags) are set by tls_on, emptied by
# tls_off. The test CA and the server's certificate (P-256, for 127.0.0.1) are made once.
TLS_SRV=() TLS_LG=()
tls_on() {
    local d=$OUT/tls
    if [ ! -s "$d/server.pem" ]; then
        command -v openssl >/dev/null || { echo "the TLS scenarios need openssl" >&2; exit 1; }
        mkdir -p "$d"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
            -subj /CN=bench-ca -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
            -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$d/ext.cnf"
        openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
            -days 2 -extfile "$d/ext.cnf" -out "$d/server.pem" 2>/dev/null
    fi
    TLS_SRV=(--tls-cert "$d/server.pem" --tls-key "$d/server.key")
    TLS_LG=(--tls-ca "$d/ca.pem")
}
tls_off() { TLS_SRV=() TLS_LG=(); }

# start_server NAME: a fresh chatloop logging to $OUT/NAME.server.log; sets SERVER_PID and ADDR.
start_server() {
    local log=$OUT/$1.server.log
    # shellcheck disable=SC2086
    start_chatloop "$log" ${LIMIT_ARGS[@]+"${LIMIT_ARGS[@]}"} ${TLS_SRV[@]+"${TLS_SRV[@]}"} ${BENCH_SERVER_ARGS:-} || exit 1
    ADDR=127.0.0.1:$PORT
    echo "== chatloop pid $SERVER_PID listening on $ADDR (log: $log)" >&2
}

TICK_US=$((1000000 / $(getconf CLK_TCK)))

# "utime_us stime_us rss_bytes" of the server (/proc/PID/stat fields 14 and 15, VmRSS).
sample() {
    local stat rss
    stat=$(cat "/proc/$SERVER_PID/stat") || { echo "chatloop (pid $SERVER_PID) is gone" >&2; exit 1; }
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat # $1 is field 3, so field N is $((N-2))
    rss=$(awk '/^VmRSS:/ {print $2 * 1024}' "/proc/$SERVER_PID/status")
    echo "$((${12} * TICK_US)) $((${13} * TICK_US)) $rss"
}

# Value of a top-level key in a one-line JSON file (numbers and plain strings).
jget() { grep -o "\"$2\":[^,}]*" "$1" | head -n 1 | cut -d: -f2- | tr -d '"' || true; }
calc() { awk "BEGIN { printf \"%.3f\", $1 }"; }

SUMMARY=()
say() { SUMMARY+=("$1"); echo "$1" >&2; }

# run NAME loadgen-args...: runs loadgen pinned, stdout JSON to $OUT/NAME.json; sets BEFORE/AFTER.
run() {
    local name=$1
    shift
    echo >&2
    echo "== $name: loadgen $*" >&2
    BEFORE=$(sample)
    "${LG_PIN[@]}" "$LG" "$@" ${TLS_LG[@]+"${TLS_LG[@]}"} --server-pid "$SERVER_PID" >"$OUT/$name.json" 2> >(tee "$OUT/$name.log" >&2) || {
        echo "loadgen $name failed: $(cat "$OUT/$name.json")" >&2
        return 1
    }
    AFTER=$(sample)
}

# Server CPU per op over the whole scenario (set-up included) from BEFORE/AFTER.
whole() {
    local ops=$1 bu bs au as
    read -r bu bs _ <<<"$BEFORE"
    read -r au as _ <<<"$AFTER"
    echo "user $(calc "($au - $bu) / ($ops > 0 ? $ops : 1)")us sys $(calc "($as - $bs) / ($ops > 0 ? $ops : 1)")us"
}

# fanout NAME ROOMS MEMBERS RATE SENDERS [tls]: with `tls`, over wss, and compared with the plain
# run of the same shape if it ran before in this invocation.
declare -A SRV_PER_DELIVERY FRAME_BYTES
fanout() {
    local name=$1 rooms=$2 members=$3 rate=$4 senders=$5 tls=${6:-} ratio=""
    if [ "$tls" = tls ]; then tls_on; fi
    start_server "$name"
    run "$name" fanout --addr "$ADDR" --rooms "$rooms" --members "$members" --senders "$senders" \
        --rate "$rate" --duration "$DUR" --warmup "$WARMUP" || { tls_off; say "$name: FAILED"; return 0; }
    tls_off
    local f=$OUT/$name.json u s t
    u=$(jget "$f" server_user_us_per_delivery)
    s=$(jget "$f" server_sys_us_per_delivery)
    t=$(calc "$u + $s")
    if [ "$tls" = tls ]; then
        if [ -n "${SRV_PER_DELIVERY[$rooms x $members]:-}" ]; then
            ratio=" => wss costs $(calc "$t / (${SRV_PER_DELIVERY[$rooms x $members]} > 0 ? ${SRV_PER_DELIVERY[$rooms x $members]} : 1)")x plain ws"
        fi
    else
        SRV_PER_DELIVERY[$rooms x $members]=$t
        FRAME_BYTES[$rooms x $members]=$(jget "$f" chat_frame_bytes)
    fi
    say "$name ${rooms}x${members} @${rate}/s/room${tls:+ over wss}: $(jget "$f" deliveries_per_s) deliveries/s, lost $(jget "$f" lost), dup $(jget "$f" duplicates), latency p50 $(jget "$f" lat_p50_us)us p99 $(jget "$f" lat_p99_us)us p99.9 $(jget "$f" lat_p999_us)us max $(jget "$f" lat_max_us)us"
    say "    server CPU per delivery (window): user ${u}us sys ${s}us (total ${t}us)$ratio; whole scenario incl. set-up: $(whole "$(jget "$f" delivered)")"
}

floor() {
    local name=$1 rooms=$2 members=$3 rate=$4 bytes
    shift 4 # the rest: extra loadgen floor flags
    bytes=${FRAME_BYTES[$rooms x $members]:-}
    [ -z "$bytes" ] || [ "$bytes" = 0 ] && bytes=200
    echo >&2
    echo "== $name: loadgen floor $* (no server involved)" >&2
    "$LG" floor --rooms "$rooms" --members "$members" --rate "$rate" --duration "$DUR" --warmup "$WARMUP" \
        --frame-bytes "$bytes" "${FLOOR_PIN[@]}" "$@" >"$OUT/$name.json" 2> >(tee "$OUT/$name.log" >&2) || {
        say "$name: FAILED $(cat "$OUT/$name.json")"
        return 0
    }
    local f=$OUT/$name.json u s t ratio=""
    u=$(jget "$f" writer_user_us_per_delivery)
    s=$(jget "$f" writer_sys_us_per_delivery)
    t=$(jget "$f" writer_total_us_per_delivery)
    if [ -n "${SRV_PER_DELIVERY[$rooms x $members]:-}" ]; then
        ratio=" => chatloop costs $(calc "${SRV_PER_DELIVERY[$rooms x $members]} / ($t > 0 ? $t : 1)")x the floor"
    fi
    say "$name ${rooms}x${members} @${rate}/s/room, ${bytes}-byte frames: $(jget "$f" deliveries_per_s) deliveries/s, latency p50 $(jget "$f" lat_p50_us)us p99 $(jget "$f" lat_p99_us)us"
    say "    writer CPU per delivery: user ${u}us sys ${s}us (total ${t}us)$ratio"
}

REST_PER_REQUEST="" REST_RESPONSE_BYTES=243
rest() {
    start_server rest
    run rest rest --addr "$ADDR" --clients "$REST_CLIENTS" --duration "$DUR" || { say "rest: FAILED"; return 0; }
    local f=$OUT/rest.json u s
    u=$(jget "$f" server_user_us_per_request)
    s=$(jget "$f" server_sys_us_per_request)
    REST_PER_REQUEST=$(calc "$u + $s")
    REST_RESPONSE_BYTES=$(jget "$f" response_bytes)
    say "rest POST /sessions x$REST_CLIENTS clients: $(jget "$f" requests_per_s) req/s, errors $(jget "$f" errors), latency p50 $(jget "$f" lat_p50_us)us p99 $(jget "$f" lat_p99_us)us"
    say "    server CPU per request (window): user ${u}us sys ${s}us; whole scenario: $(whole "$(jget "$f" requests)")"
}

# The same rest load against `loadgen httpfloor`, a minimal HTTP server answering every
# request with a canned response of chatloop's size: REST's floor on this machine.
restfloor() {
    local log=$OUT/restfloor.server.log f=$OUT/restfloor.json u s t ratio=""
    SERVER_ARGS0=(httpfloor --duration 600s --response-bytes "$REST_RESPONSE_BYTES")
    CHATLOOP_BIN=$LG start_chatloop "$log" || exit 1
    SERVER_ARGS0=()
    ADDR=127.0.0.1:$PORT
    echo "== httpfloor pid $SERVER_PID listening on $ADDR (log: $log)" >&2
    run restfloor rest --addr "$ADDR" --clients "$REST_CLIENTS" --duration "$DUR" || { say "restfloor: FAILED"; return 0; }
    u=$(jget "$f" server_user_us_per_request)
    s=$(jget "$f" server_sys_us_per_request)
    t=$(calc "$u + $s")
    [ -n "$REST_PER_REQUEST" ] && ratio=" => chatloop costs $(calc "$REST_PER_REQUEST / ($t > 0 ? $t : 1)")x the floor"
    say "restfloor (minimal server, ${REST_RESPONSE_BYTES}-byte responses) x$REST_CLIENTS clients: $(jget "$f" requests_per_s) req/s, latency p50 $(jget "$f" lat_p50_us)us p99 $(jget "$f" lat_p99_us)us"
    say "    floor CPU per request (window): user ${u}us sys ${s}us (total ${t}us)$ratio"
}

# connect NAME [tls]: a new connection per request (GET /health, `Connection: close`), over TLS
# with `tls`: every request pays a full handshake (the server sends no resumption tickets).
CONNECT_PER_REQUEST=""
connect() {
    local name=$1 tls=${2:-} f u s t extra=""
    if [ "$tls" = tls ]; then tls_on; fi
    start_server "$name"
    run "$name" rest --addr "$ADDR" --new-conn --path /health --clients "$REST_CLIENTS" --duration "$DUR" \
        || { tls_off; say "$name: FAILED"; return 0; }
    tls_off
    f=$OUT/$name.json
    u=$(jget "$f" server_user_us_per_request)
    s=$(jget "$f" server_sys_us_per_request)
    t=$(calc "$u + $s")
    if [ "$tls" = tls ]; then
        [ -n "$CONNECT_PER_REQUEST" ] && extra=" => server CPU per TLS handshake: $(calc "$t - $CONNECT_PER_REQUEST")us (minus the plain connection's ${CONNECT_PER_REQUEST}us)"
    else
        CONNECT_PER_REQUEST=$t
    fi
    say "$name${tls:+ (TLS)}: $(jget "$f" requests_per_s) connections/s (a new connection per GET /health, $REST_CLIENTS clients), errors $(jget "$f" errors), connect+request p50 $(jget "$f" lat_p50_us)us p99 $(jget "$f" lat_p99_us)us"
    say "    server CPU per connection (window): user ${u}us sys ${s}us (total ${t}us)$extra"
}

join() {
    start_server join
    run join join --addr "$ADDR" --room-members 100 --joins "$JOINS" --concurrency "$JOIN_CONCURRENCY" --duration "$DUR" || { say "join: FAILED"; return 0; }
    local f=$OUT/join.json
    say "join into a 100-member room: $(jget "$f" joins_per_s) joins/s ($(jget "$f" joins) joins, $(jget "$f" failures) failures), connect->welcome p50 $(jget "$f" lat_p50_us)us p99 $(jget "$f" lat_p99_us)us"
    say "    server CPU per join+leave (window): user $(jget "$f" server_user_us_per_join)us sys $(jget "$f" server_sys_us_per_join)us; whole scenario: $(whole "$(jget "$f" joins)")"
}

# idle [NAME tls]: idlewss holds the sockets over wss.
idle() {
    local name=${1:-idle} tls=${2:-}
    echo >&2
    if [ "$tls" = tls ]; then tls_on; fi
    start_server "$name"
    echo "== $name: loadgen idle --conns $IDLE_CONNS --duration $IDLE_HOLD ${TLS_LG[*]}" >&2
    local log=$OUT/$name.log f=$OUT/$name.json pid ready="" before_rss at_ready
    read -r _ _ before_rss <<<"$(sample)"
    "${LG_PIN[@]}" "$LG" idle --addr "$ADDR" --conns "$IDLE_CONNS" --duration "$IDLE_HOLD" \
        ${TLS_LG[@]+"${TLS_LG[@]}"} --server-pid "$SERVER_PID" >"$f" 2>"$log" &
    tls_off
    pid=$!
    for _ in $(seq 3000); do # up to 300 s to connect
        ready=$(grep -o '^READY [0-9]*' "$log" | head -n 1 | cut -d' ' -f2) || true
        [ -n "$ready" ] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    sleep 1 # let the last user_joined broadcasts drain
    read -r _ _ at_ready <<<"$(sample)"
    wait "$pid" || true
    cat "$log" >&2
    if [ -z "$ready" ] || [ "$ready" = 0 ]; then
        say "$name: FAILED (no READY); see $log"
        return 0
    fi
    say "$name: $ready/$IDLE_CONNS sockets held (failures $(jget "$f" failures), dropped while held: $(grep -o '"dropped":{[^}]*}' "$f" || true))"
    say "    server RSS $((before_rss / 1024)) KiB -> $((at_ready / 1024)) KiB: $(calc "($at_ready - $before_rss) / $ready") bytes per idle ${tls:+wss }connection"
    say "    (kernel socket buffers are not in RSS; the delta includes one user_joined per socket kept in room history)"
}

# cluster NAME NODES [shard]: fan-out 10 x 50 through NODES chatloop nodes sharing one
# redis-server (NODES=0: one node without Redis, the baseline for the Redis hop); with
# `shard`, that redis-server is a Redis Cluster of one master holding every slot; with `shard3`,
# three redis-servers make a Redis Cluster of three masters.
cluster() {
    local name=$1 nodes=$2 shard=${3:-} redis_args=() node_args=() extra="" pid1 port1 up cluster_args=()
    command -v redis-server >/dev/null || { say "$name: SKIPPED (no redis-server; apt-get install redis-server)"; return 0; }
    local saved_prefix=("${SERVER_PREFIX[@]}")
    SERVER_PREFIX=()
    if [ "$nodes" -gt 0 ]; then
        REDIS_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        if [ "$shard" = shard3 ]; then
            local i ports=() seeds="" pids=""
            for i in 1 2 3; do
                local p cp
                p=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
                cp=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
                rm -f "$OUT/$name.nodes$i.conf"
                redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no --cluster-enabled yes \
                    --cluster-config-file "$OUT/$name.nodes$i.conf" --cluster-port "$cp" >"$OUT/$name.redis$i.log" 2>&1 &
                pids="$pids $!"
                ports+=("$p")
                seeds="$seeds,127.0.0.1:$p"
            done
            REDIS_PID=${pids# }
            for p in "${ports[@]}"; do
                for _ in $(seq 1 100); do
                    [ "$(redis-cli -p "$p" ping 2>/dev/null)" = PONG ] && break
                    sleep 0.1
                done
            done
            redis-cli --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-yes >"$OUT/$name.create.log" 2>&1 </dev/null ||
                { say "$name: FAILED (redis-cli --cluster create; see $OUT/$name.create.log)"; stop_cluster; return 0; }
            for p in "${ports[@]}"; do
                for _ in $(seq 1 100); do
                    redis-cli -p "$p" cluster info 2>/dev/null | grep -q cluster_state:ok && break
                    sleep 0.1
                done
            done
            redis_args=(--redis "redis-cluster://${seeds#,}")
            extra=${REDIS_PID// /,}
        elif [ -n "$shard" ]; then
            rm -f "$OUT/$name.nodes.conf"
            cluster_args=(--cluster-enabled yes --cluster-config-file "$OUT/$name.nodes.conf"
                --cluster-port "$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')")
        fi
        redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no ${cluster_args[@]+"${cluster_args[@]}"} >"$OUT/$name.redis.log" 2>&1 &
        REDIS_PID=$!
        for _ in $(seq 1 100); do
            [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break
            sleep 0.1
        done
        if [ "$shard" = shard ]; then
            redis-cli -p "$REDIS_PORT" cluster addslotsrange 0 16383 >/dev/null
            for _ in $(seq 1 100); do
                redis-cli -p "$REDIS_PORT" cluster info 2>/dev/null | grep -q cluster_state:ok && break
                sleep 0.1
            done
        fi
        if [ "$shard" != shard3 ]; then
            redis_args=(--redis "redis://127.0.0.1:$REDIS_PORT/0")
            extra=$REDIS_PID
        fi
    fi
    start_chatloop "$OUT/$name.server.log" "${redis_args[@]}" ${LIMIT_ARGS[@]+"${LIMIT_ARGS[@]}"} --chat-rate 1000 --chat-burst 1000 || {
        say "$name: FAILED (server start)"; SERVER_PREFIX=("${saved_prefix[@]}"); stop_cluster; return 0; }
    pid1=$SERVER_PID port1=$PORT
    if [ "$nodes" -gt 1 ]; then
        start_chatloop "$OUT/$name.node2.log" "${redis_args[@]}" ${LIMIT_ARGS[@]+"${LIMIT_ARGS[@]}"} --chat-rate 1000 --chat-burst 1000 || {
            say "$name: FAILED (node 2 start)"; SERVER_PREFIX=("${saved_prefix[@]}"); stop_cluster; return 0; }
        NODE2_PID=$SERVER_PID
        node_args=(--nodes "127.0.0.1:$PORT")
        extra="$NODE2_PID,$extra"
        SERVER_PID=$pid1 PORT=$port1
    fi
    SERVER_PREFIX=("${saved_prefix[@]}")
    for log in "$OUT/$name.server.log" "$OUT/$name.node2.log"; do
        if [ "$nodes" = 0 ] || [ ! -e "$log" ]; then continue; fi
        up=""
        for _ in $(seq 1 100); do
            grep -q "connected to Redis" "$log" && { up=1; break; }
            sleep 0.1
        done
        [ -n "$up" ] || { say "$name: FAILED (a node did not reach Redis; see $log)"; stop_cluster; return 0; }
    done
    echo >&2
    echo "== $name: $nodes node(s) with Redis, loadgen fanout 10x50 @ $CLUSTER_RATE/s/room" >&2
    local extra_args=()
    [ -n "$extra" ] && extra_args=(--extra-pids "${extra%,}")
    "$LG" fanout --addr "127.0.0.1:$port1" "${node_args[@]}" --rooms 10 --members 50 --senders 10 \
        --rate "$CLUSTER_RATE" --duration "$DUR" --warmup "$WARMUP" --server-pid "$pid1" "${extra_args[@]}" \
        >"$OUT/$name.json" 2> >(tee "$OUT/$name.log" >&2) || { say "$name: FAILED $(cat "$OUT/$name.json")"; stop_cluster; return 0; }
    local f=$OUT/$name.json what="1 node, no Redis"
    [ "$nodes" -gt 0 ] && what="$nodes node(s) + Redis"
    [ "$shard" = shard ] && what="$nodes node(s) + a one-master Redis Cluster"
    [ "$shard" = shard3 ] && what="$nodes node(s) + a three-master Redis Cluster"
    say "$name ($what) 10x50 @${CLUSTER_RATE}/s/room: $(jget "$f" deliveries_per_s) deliveries/s, lost $(jget "$f" lost), dup $(jget "$f" duplicates), latency p50 $(jget "$f" lat_p50_us)us p99 $(jget "$f" lat_p99_us)us max $(jget "$f" lat_max_us)us"
    say "    CPU per delivery, nodes + redis-server summed (window): user $(jget "$f" server_user_us_per_delivery)us sys $(jget "$f" server_sys_us_per_delivery)us"
    stop_cluster
}

REPEAT=${BENCH_REPEAT:-1}
for rep in $(seq "$REPEAT"); do
    [ "$REPEAT" -gt 1 ] && say "-- run $rep of $REPEAT"
    for s in "${SCENARIOS[@]}"; do
        case $s in
            fanout1k) fanout fanout1k 1 1000 20 2 ;;
            fanout10x50) fanout fanout10x50 10 50 100 10 ;;
            floor1k) floor floor1k 1 1000 20 ;;
            floor10x50) floor floor10x50 10 50 100 ;;
            relay1k) floor relay1k 1 1000 20 --relay ;;
            relay10x50) floor relay10x50 10 50 100 --relay ;;
            rest) rest ;;
            restfloor) restfloor ;;
            join) join ;;
            idle) idle ;;
            wss1k) fanout wss1k 1 1000 20 2 tls ;;
            wss10x50) fanout wss10x50 10 50 100 10 tls ;;
            connect) connect connect ;;
            tlsconnect) connect tlsconnect tls ;;
            idlewss) idle idlewss tls ;;
            cluster0) cluster cluster0 0 ;;
            cluster1) cluster cluster1 1 ;;
            cluster2) cluster cluster2 2 ;;
            cluster1s) cluster cluster1s 1 shard ;;
            cluster2s) cluster cluster2s 2 shard ;;
            cluster1s3) cluster cluster1s3 1 shard3 ;;
            cluster2s3) cluster cluster2s3 2 shard3 ;;
        esac
        if [ -n "$SERVER_PID" ]; then
            kill -0 "$SERVER_PID" 2>/dev/null || say "chatloop died during $s; see $OUT/$s.server.log"
            stop_chatloop
        fi
    done
done

echo >&2
echo "== summary (JSON per scenario in $OUT/)" >&2
printf '%s\n' "${SUMMARY[@]}"
