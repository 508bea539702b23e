# tools/bench-lib.sh: helpers shared by tools/bench and tools/bench-mirror (sourced, not run).
# Each caller defines `die` before sourcing.

# The working sets both scripts measure (BENCH_SETS), one table each: `resident` touches
# BENCH_REGION_RESIDENT bytes of the export (default 128M, inside the default 256 MiB read cache),
# `large` BENCH_REGION_LARGE (default 1G, four times the read cache). Defined once here so the
# mirror table and tools/bench's table always describe the same regions.
bench_sets_default="resident large"

# Bytes the jobs of working set `set` touch.
region_of() { # set
    case $1 in
        resident) echo "${BENCH_REGION_RESIDENT:-128M}" ;;
        large) echo "${BENCH_REGION_LARGE:-1G}" ;;
        *) return 1 ;;
    esac
}

# Fails (via die) unless every word of `sets` names a working set.
check_sets() { # sets
    local set
    [[ -n ${1// /} ]] || die "BENCH_SETS is empty (known: $bench_sets_default)"
    for set in $1; do
        region_of "$set" >/dev/null || die "BENCH_SETS takes resident and/or large, not '$set'"
    done
}

# The region the prefill writes: the largest of the sets run, so every job touches written data.
largest_region() { # sets
    if [[ " $1 " == *" large "* ]]; then region_of large; else region_of resident; fi
}

# A TCP port free on loopback right now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until `port` accepts connections, failing early (with the log) when `pid` exits.
wait_port() { # port pid name log
    local port=$1 pid=$2 name=$3 log=$4 i
    for ((i = 0; i < 150; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "--- $name log ---" >&2; cat "$log" >&2
            echo "$name exited before serving" >&2
            return 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "--- $name log ---" >&2; cat "$log" >&2
    echo "$name did not accept connections on port $port within 15 s" >&2
    return 1
}

# Member size in MiB for a RAID-5 of four members (three data) exporting `size` (e.g. 1G).
raid5_member_mib() {
    python3 -c "
import re,sys
s='$1'; m=re.fullmatch(r'(\d+)([KMGT]?)(iB)?', s)
if not m: sys.exit('bad image size: ' + s)
n=int(m.group(1))*{'':1,'K':2**10,'M':2**20,'G':2**30,'T':2**40}[m.group(2)]
print(-(-n // (3*2**20)) + 16)"
}

# The [[array]] + journaled [[volume]] + [nvram] sections of a RAID-5 journaled bench volume.
raid5_journal_sections() { # member_mib nvram_file persistence [read_cache]
    echo "[[array]]"
    echo "name = \"md0\""
    echo "level = 5"
    echo "chunk = \"64KiB\""
    echo "disks = [\"disks/d0.img\", \"disks/d1.img\", \"disks/d2.img\", \"disks/d3.img\"]"
    echo "disk_size = \"$1MiB\""
    echo "create = true"
    echo
    echo "[[volume]]"
    echo "name = \"bench\""
    echo "description = \"tools/bench RAID-5 journaled\""
    echo "array = \"md0\""
    echo "journal = true"
    [[ -z ${4:-} ]] || echo "read_cache = \"$4\""
    echo
    echo "[nvram]"
    echo "path = \"$2\""
    echo "size = \"256MiB\""
    echo "persistence = \"$3\""
}

# Builds twinblockd (release) unless TWINBLOCKD names a binary; prints the binary's path.
find_twinblockd() { # repo
    if [[ -n ${TWINBLOCKD:-} ]]; then
        echo "$TWINBLOCKD"
        return
    fi
    echo "building twinblockd (cargo build --release)" >&2
    (cd "$1" && cargo build --release --bin twinblockd >&2) || return 1
    echo "${CARGO_TARGET_DIR:-$1/target}/release/twinblockd"
}

# CPU time (user + system, clock ticks) the given processes used so far.
cpu_ticks() {
    local t=0 pid f
    for pid in "$@"; do
        read -r -a f < <(sed 's/^.*) //' "/proc/$pid/stat")
        t=$((t + f[11] + f[12])) # utime, stime (fields 14 and 15 of stat)
    done
    echo "$t"
}

# Waits until the given server processes are idle together (under 5% of a core for 0.5 s, at most
# 30 s); `who` names the script in the warning printed when they do not.
settle_pids() { # who pid...
    local who=$1 ticks_per_s before after i
    shift
    ticks_per_s=$(getconf CLK_TCK)
    for ((i = 0; i < 60; i++)); do
        before=$(cpu_ticks "$@")
        sleep 0.5
        after=$(cpu_ticks "$@")
        ((after - before <= ticks_per_s / 40)) && return 0
    done
    echo "$who: the servers did not go idle within 30 s before the next job" >&2
}
