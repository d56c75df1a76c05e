#!/bin/sh
# Init container of the gpufleet-agent DaemonSet. The downward API cannot
# expose node labels to a pod, so this reads the pod's own Node object from
# the API server (RBAC: get nodes, nothing else) and writes the agent's
# config: the shared agent.toml plus a [node] table with
#   provider      <- spec.providerID scheme (aws, gce->gcp, azure, ...), else DEFAULT_PROVIDER
#   region        <- label topology.kubernetes.io/region, else DEFAULT_REGION
#   zone          <- label topology.kubernetes.io/zone
#   instance_type <- label node.kubernetes.io/instance-type
#   price         <- label gpufleet.io/price-per-gpu-hour, else DEFAULT_PRICE
# Label values are [A-Za-z0-9._-] by Kubernetes' rules, so they go into
# TOML strings unescaped; anything else is rejected below.
set -eu

: "${NODE_NAME:?NODE_NAME must come from the downward API (spec.nodeName)}"
SA_DIR=${SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}
API=${API:-https://kubernetes.default.svc}
TEMPLATE=${TEMPLATE:-/etc/gpufleet-template/agent.toml}
OUT=${OUT:-/run/gpufleet/agent.toml}

node_json=$(curl -sS --fail --max-time 20 --retry 5 --retry-all-errors \
    --cacert "$SA_DIR/ca.crt" \
    -H "Authorization: Bearer $(cat "$SA_DIR/token")" \
    "$API/api/v1/nodes/$NODE_NAME")

# One JSON string field by its exact key; empty when absent.
field() {
    printf '%s\n' "$node_json" | sed 's/[,{}]/\n/g' |
        sed -n "s|^[[:space:]]*\"$1\"[[:space:]]*:[[:space:]]*\"\\([^\"]*\\)\".*|\\1|p" | head -n 1
}
checked() {
    case $2 in
        *[!A-Za-z0-9._-]*) echo "node-config: $NODE_NAME: $1 '$2' has characters other than A-Za-z0-9._-" >&2; exit 1 ;;
    esac
    printf '%s' "$2"
}

provider_id=$(field providerID)
case ${provider_id%%://*} in
    aws) provider=aws ;;
    gce) provider=gcp ;;
    azure) provider=azure ;;
    oci) provider=oci ;;
    "") provider=${DEFAULT_PROVIDER:-onprem} ;;
    *) provider=${provider_id%%://*} ;;
esac
region=$(field 'topology\.kubernetes\.io/region')
zone=$(field 'topology\.kubernetes\.io/zone')
instance_type=$(field 'node\.kubernetes\.io/instance-type')
price=$(field 'gpufleet\.io/price-per-gpu-hour')
price=${price:-${DEFAULT_PRICE:-0}}
case $price in
    '' | *[!0-9.]* | *.*.*) echo "node-config: $NODE_NAME: price '$price' is not a number like 3.93" >&2; exit 1 ;;
    *.*) ;;
    *) price=$price.0 ;;
esac

region=${region:-${DEFAULT_REGION:-local}}
# Assignments, so that set -e stops on a rejected value.
node_id=$(checked node "$NODE_NAME")
provider=$(checked provider "$provider")
region=$(checked region "$region")
zone=$(checked zone "$zone")
instance_type=$(checked instance_type "$instance_type")

mkdir -p "$(dirname "$OUT")"
{
    cat "$TEMPLATE"
    echo
    echo "# From node $node_id (written by node-config.sh)."
    echo "[node]"
    echo "id = \"$node_id\""
    echo "provider = \"$provider\""
    echo "region = \"$region\""
    echo "zone = \"$zone\""
    echo "instance_type = \"$instance_type\""
    echo "price_per_gpu_hour_usd = $price"
} >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "node-config: wrote $OUT for $node_id: provider=$provider region=$region zone=$zone instance_type=$instance_type price=$price"
