module evalrun.local/cluster/images

go 1.25.0
