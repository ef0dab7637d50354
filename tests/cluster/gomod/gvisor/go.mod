module evalrun.local/cluster/gvisor

go 1.25.5

require gvisor.dev/gvisor v0.0.0-20260413194555-9680d69bf798

replace gvisor.dev/gvisor => ../gvisor
