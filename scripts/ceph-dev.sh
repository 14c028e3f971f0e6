#!/usr/bin/env bash
# A single-node Ceph cluster for tests and trying RBD datastores by hand: one monitor on
# ADDR:PORT (msgr2; ADDR 127.0.0.1 unless given), one mgr, one bluestore OSD on a sparse file,
# all under DIR, from Debian's packages (ceph-mon ceph-osd ceph-mgr ceph-common; scripts/setup.sh
# installs them). No systemd, cephadm or LVM. Ready (pool active+clean) in about 15 s.
#   scripts/ceph-dev.sh start DIR [ADDR:]PORT [POOL]
#                                              starts it; POOL (default corral) is an initialized
#                                              RBD pool, and DIR/client.corral.keyring a user
#                                              with `profile rbd` on it
#   scripts/ceph-dev.sh stop DIR                stops the daemons (by pid) and removes DIR
set -euo pipefail

usage() { echo "usage: $0 start DIR [ADDR:]PORT [POOL] | stop DIR" >&2; exit 2; }

stop() {
  local dir=$1
  for pidfile in "$dir"/run/*.pid; do
    [ -e "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  for pidfile in "$dir"/run/*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    for _ in $(seq 50); do
      # A daemon that exited may linger as a zombie where PID 1 does not reap: that is gone too.
      state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo X)
      [ "$state" = X ] || [ "$state" = Z ] && break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$dir"
}

start() {
  local dir=$1 addr=127.0.0.1 port=$2 pool=${3:-corral}
  if [[ $port == *:* ]]; then
    addr=${port%:*}
    port=${port##*:}
  fi
  command -v ceph-mon >/dev/null || { echo "ceph-dev: ceph-mon is missing: run scripts/setup.sh" >&2; exit 1; }
  mkdir -p "$dir"/{mon,osd,mgr,run,log}
  dir=$(cd "$dir" && pwd)
  local fsid conf="$dir/ceph.conf"
  fsid=$(cat /proc/sys/kernel/random/uuid)
  cat >"$conf" <<CONF
[global]
fsid = $fsid
mon_host = v2:$addr:$port
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_allow_pool_delete = true
run_dir = $dir/run
log_file = $dir/log/\$name.log
mon_cluster_log_file = $dir/log/cluster.log
client_mount_timeout = 10
[client]
keyring = $dir/client.admin.keyring
[mon]
mon_data = $dir/mon/\$cluster-\$id
admin_socket = $dir/run/\$name.asok
pid_file = $dir/run/\$name.pid
[mgr]
mgr_data = $dir/mgr/\$cluster-\$id
admin_socket = $dir/run/\$name.asok
pid_file = $dir/run/\$name.pid
mgr_disabled_modules = dashboard
[osd]
osd_data = $dir/osd/\$cluster-\$id
osd_objectstore = bluestore
bluestore_block_path = $dir/osd/block
bluestore_block_create = true
bluestore_block_size = 8589934592
osd_memory_target = 1073741824
admin_socket = $dir/run/\$name.asok
pid_file = $dir/run/\$name.pid
CONF
  local c=(--conf "$conf")
  ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/client.admin.keyring" >/dev/null
  monmaptool --create --addv a "[v2:$addr:$port]" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-mon "${c[@]}" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring" 2>/dev/null
  ceph-mon "${c[@]}" -i a
  mkdir -p "$dir/mgr/ceph-x"
  ceph "${c[@]}" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$dir/mgr/ceph-x/keyring" >/dev/null
  ceph-mgr "${c[@]}" -i x
  local uuid id
  uuid=$(cat /proc/sys/kernel/random/uuid)
  id=$(ceph "${c[@]}" osd new "$uuid")
  mkdir -p "$dir/osd/ceph-$id"
  ceph "${c[@]}" auth get-or-create "osd.$id" mon 'allow profile osd' mgr 'allow profile osd' \
    osd 'allow *' -o "$dir/osd/ceph-$id/keyring" >/dev/null
  ceph-osd "${c[@]}" -i "$id" --mkfs --osd-uuid "$uuid" 2>/dev/null
  ceph-osd "${c[@]}" -i "$id" 2>/dev/null
  ceph "${c[@]}" osd pool create "$pool" 8 >/dev/null 2>&1
  rbd "${c[@]}" pool init "$pool"
  ceph "${c[@]}" auth get-or-create client.corral mon 'profile rbd' osd "profile rbd pool=$pool" \
    -o "$dir/client.corral.keyring" >/dev/null
  for _ in $(seq 120); do
    if ceph "${c[@]}" pg stat 2>/dev/null | grep -q "active+clean" &&
      ! ceph "${c[@]}" pg stat 2>/dev/null | grep -qE "creating|peering|activating|unknown"; then
      echo "ceph-dev: up on $addr:$port, pool $pool, admin conf $conf"
      return 0
    fi
    sleep 0.5
  done
  echo "ceph-dev: the pool did not become active+clean within 60 s; logs in $dir/log" >&2
  ceph "${c[@]}" -s >&2 || true
  exit 1
}

case "${1:-}" in
  start) [ $# -ge 3 ] || usage; start "$2" "$3" "${4:-}" ;;
  stop) [ $# -eq 2 ] || usage; stop "$2" ;;
  *) usage ;;
esac
