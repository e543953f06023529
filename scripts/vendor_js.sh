#!/usr/bin/env bash
# Refresh the dashboard's vendored JavaScript from the npm registry (no build step: the
# packages' own minified files are copied as they are, with their licences).
#
#   scripts/vendor_js.sh                      # the versions pinned below
#   CYTOSCAPE=3.36.0 UPLOT=1.6.33 FCOSE=2.2.1 scripts/vendor_js.sh
#
# cytoscape and uPlot ship minified builds; cytoscape-fcose (the fast force layout, with its
# dependencies cose-base and layout-base) ships one UMD build each, copied as it is.
#
# Needs npm (only here, never at install time). Then update the versions and checksums in
# zgrid/dashboard/static/vendor/VENDOR.md, run the browser tests, and commit.
set -euo pipefail
cytoscape=${CYTOSCAPE:-3.35.0}
uplot=${UPLOT:-1.6.32}
fcose=${FCOSE:-2.2.0}
cose_base=${COSE_BASE:-2.2.0}
layout_base=${LAYOUT_BASE:-2.0.1}
root=$(cd "$(dirname "$0")/.." && pwd)
vendor=$root/zgrid/dashboard/static/vendor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "cytoscape@$cytoscape" "uplot@$uplot" "cytoscape-fcose@$fcose" \
    "cose-base@$cose_base" "layout-base@$layout_base" >/dev/null
for pkg in "cytoscape-$cytoscape" "uplot-$uplot" "cytoscape-fcose-$fcose" \
           "cose-base-$cose_base" "layout-base-$layout_base"; do
    mkdir "$pkg" && tar xzf "$pkg.tgz" -C "$pkg" --strip-components 1
done
cp "cytoscape-$cytoscape/dist/cytoscape.min.js" "$vendor/"
cp "cytoscape-$cytoscape/LICENSE" "$vendor/LICENSE.cytoscape"
cp "uplot-$uplot/dist/uPlot.iife.min.js" "uplot-$uplot/dist/uPlot.min.css" "$vendor/"
cp "uplot-$uplot/LICENSE" "$vendor/LICENSE.uplot"
for pkg in "cytoscape-fcose:$fcose" "cose-base:$cose_base" "layout-base:$layout_base"; do
    name=${pkg%%:*} version=${pkg##*:}
    cp "$name-$version/$name.js" "$vendor/"
    cp "$name-$version/LICENSE" "$vendor/LICENSE.$name"
done
sha256sum ./*.tgz
(cd "$vendor" && sha256sum ./*.js ./*.css)
echo "vendored cytoscape $cytoscape, uPlot $uplot, cytoscape-fcose $fcose (cose-base" \
     "$cose_base, layout-base $layout_base) into $vendor"
