# shellcheck shell=bash
# Sourced by the test scripts (tests/promtool.sh, examples/python/ci.sh).
# They start the binaries on 127.0.0.1:0 with `--log-format json` and read
# the port the kernel picked from their startup line, so that no script
# guesses a free port (a guessed one can be taken before the binary binds).
#
#   logged_field PID LOG MESSAGE FIELD
#
# Prints FIELD of the first JSON log line in LOG whose message is MESSAGE,
# waiting up to 30 s while PID runs; fails if it never appears. The lines
# read: the controller's "controller serving" (local_addr, metrics as a
# URL) and the agent's "agent started" (listen, metrics as `Some(addr)`).
logged_field() {
    local pid=$1 log=$2 message=$3 field=$4 value
    for _ in $(seq 1 300); do
        value=$(grep -F "\"message\":\"$message\"" "$log" 2>/dev/null | head -n 1 \
            | sed -n "s/.*\"$field\":\"\\([^\"]*\\)\".*/\\1/p")
        if [[ -n $value ]]; then
            printf '%s\n' "$value"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "no \"$message\" line with $field in $log:" >&2
    cat "$log" >&2
    return 1
}

# host:port out of `http://host:port/metrics` or `Some(host:port)`.
bare_addr() {
    local addr=${1#http://}
    addr=${addr%/metrics}
    addr=${addr#Some(}
    printf '%s\n' "${addr%)}"
}
