# bench-lib.sh - what the measuring scripts share; source it (`. "$ROOT/scripts/bench-lib.sh"`).

# wait_port PORT: until something accepts on 127.0.0.1:PORT (at most 10 s), then 1 s more for
# the server to settle.
wait_port() {
    for _ in $(seq 1 100); do
        (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && break
        sleep 0.1
    done
    sleep 1
}
