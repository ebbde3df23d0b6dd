/* main.c - kvd: parse the configuration, run the loop, exit with a meaningful status.
 *
 * Exit status: 0 after a clean drain (SIGINT/SIGTERM) or --help, 1 when the model
 * cannot be loaded or the address cannot be bound, 2 for invalid configuration
 * (the message names the key or flag). SIGPIPE is ignored: a peer that vanishes
 * mid-write is an ordinary write error, never a reason to die.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include <uv.h>

#include "daemon.h"
#include "config.h"

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    kvd_server_config cfg;
    kvd_error err = {0};
    bool show_help = false;
    if (kvd_config_from_args(&cfg, argc, argv, &show_help, &err) != 0) {
        fprintf(stderr, "kvd: %s\n", err.msg);
        return 2;
    }
    if (show_help) {
        kvd_config_print_help(stdout, argv[0]);
        return 0;
    }
    if (kvd_config_validate(&cfg, &err) != 0) {
        fprintf(stderr, "kvd: %s\n", err.msg);
        return 2;
    }

    uv_loop_t loop;
    if (uv_loop_init(&loop) != 0) {
        fprintf(stderr, "kvd: cannot create the event loop\n");
        return 1;
    }
    kvd_daemon daemon;
    if (kvd_daemon_init(&daemon, &loop, &cfg, &err) != 0) {
        fprintf(stderr, "kvd: %s\n", err.msg);
        uv_loop_close(&loop);
        return 2;
    }
    int status;
    if (kvd_daemon_start(&daemon, &err) != 0) {
        fprintf(stderr, "kvd: %s\n", err.msg);
        status = err.code == KVD_EINVAL ? 2 : 1;
        uv_run(&loop, UV_RUN_DEFAULT);
    } else {
        uv_run(&loop, UV_RUN_DEFAULT);
        status = daemon.exit_code;
    }
    kvd_daemon_deinit(&daemon);
    if (uv_loop_close(&loop) != 0)
        fprintf(stderr, "kvd: warning: event loop closed with handles still open\n");
    if (status == 0)
        fprintf(stderr, "kvd: stopped\n");
    return status;
}
