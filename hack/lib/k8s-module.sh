# Sourced by the hack/build-*.sh scripts that build Kubernetes components.
#
# k8s_wrapper_module DIR VERSION MODULE PKG...: write DIR/go.mod and DIR/tools.go for a
# module that builds PKG... from k8s.io/kubernetes@vVERSION. k8s.io/kubernetes points its
# staging modules (k8s.io/api, k8s.io/client-go, ...) at ./staging; the wrapper pins each
# of them to its published release instead. Every script generates the same requirements,
# so the Go build cache is shared between them.
k8s_wrapper_module() {
  local dir=$1 version=$2 module=$3; shift 3
  local staging="0.${version#1.}" modfile pkg
  modfile=$(cd "$dir" && go mod download -json "k8s.io/kubernetes@v$version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "module $module"
    echo "go 1.26"
    echo "require k8s.io/kubernetes v$version"
    sed -n '/^replace (/,/^)/p' "$modfile" \
      | sed -n 's#^\s*\(k8s.io/[a-z-]*\) => ./staging.*#replace \1 => \1 v'"$staging"'#p'
  } > "$dir/go.mod"
  {
    echo "package main"
    for pkg in "$@"; do echo "import _ \"$pkg\""; done
  } > "$dir/tools.go"
  (cd "$dir" && go mod tidy >&2)
}

# The -ldflags that stamp the Kubernetes version into a component (as its release build does).
k8s_ldflags() {
  local version=$1 staging="0.${1#1.}"
  echo "-s -w -X k8s.io/component-base/version.gitVersion=v$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${staging#0.}"
}
